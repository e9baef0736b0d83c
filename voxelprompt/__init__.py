"""VoxelPrompt: a neuroimaging assistant that answers requests about brain scans by writing,
running and showing Python code."""

__version__ = "0.1.0"
