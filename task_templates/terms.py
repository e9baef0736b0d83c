"""ROI terminology: names for anatomy (FreeSurfer-style keys), lobes, lesions and their ontology.

Each anatomical key (the side-free part of a name resolvable by ``synth.anatomy.Anatomy.structure``)
has a canonical phrase (first) and synonyms. Lesions are named from their metadata: a class term
or an ontology parent (glioma → neoplasm → mass → lesion), plus adjectives (side, lobe, signal,
enhancement, acuity) placed before or after the noun.
"""

from __future__ import annotations

# key -> (bilateral?, [canonical, synonyms...]). Bilateral keys get "Left-"/"Right-" prefixes.
ANATOMY: dict[str, tuple[bool, list[str]]] = {
    "Hippocampus": (True, ["hippocampus", "hippocampal formation", "hippocampal region", "hippocampal body"]),
    "Amygdala": (True, ["amygdala", "amygdaloid body", "amygdalar nuclei", "amygdaloid complex"]),
    "Thalamus-Proper": (True, ["thalamus", "thalamic nuclei", "thalamic region", "dorsal thalamus"]),
    "Caudate": (True, ["caudate", "caudate nucleus", "caudate head and body", "nucleus caudatus"]),
    "Putamen": (True, ["putamen", "putaminal nucleus", "lateral striatum"]),
    "Pallidum": (True, ["pallidum", "globus pallidus", "pallidal nucleus", "paleostriatum"]),
    "Accumbens-area": (True, ["nucleus accumbens", "accumbens", "accumbens area", "ventral striatum core"]),
    "VentralDC": (True, ["ventral diencephalon", "ventral DC", "ventral diencephalic region"]),
    "Lateral-Ventricle": (True, ["lateral ventricle", "lateral ventricular body", "lateral cerebral ventricle"]),
    "Inf-Lat-Vent": (True, ["temporal horn", "inferior lateral ventricle", "temporal horn of the lateral ventricle"]),
    "Cerebral-White-Matter": (True, ["cerebral white matter", "white matter", "hemispheric white matter"]),
    "Cerebral-Cortex": (True, ["cerebral cortex", "cortex", "cortical gray matter", "cortical ribbon"]),
    "Cerebellum-Cortex": (True, ["cerebellar cortex", "cerebellar gray matter", "cerebellar grey matter"]),
    "Cerebellum-White-Matter": (True, ["cerebellar white matter", "cerebellar WM", "arbor vitae"]),
    "Cerebellum": (True, ["cerebellar hemisphere", "cerebellum", "hemicerebellum"]),
    "Cerebrum": (True, ["cerebral hemisphere", "cerebrum", "telencephalon", "hemicerebrum"]),
    "Dorsal-Striatum": (True, ["dorsal striatum", "dorsal striate nucleus", "caudate and putamen"]),
    "Striatum": (True, ["striatum", "corpus striatum", "striate nucleus"]),
    "Lentiform-Nucleus": (True, ["lentiform nucleus", "lenticular nucleus", "putamen and globus pallidus"]),
    "Basal-Ganglia": (True, ["basal ganglia", "basal nuclei", "deep gray nuclei"]),
    "Hemisphere": (True, ["hemisphere", "cerebral half", "half of the brain"]),
    "Frontal-Lobe": (True, ["frontal lobe", "frontal region", "frontal lobar region"]),
    "Parietal-Lobe": (True, ["parietal lobe", "parietal region", "parietal lobar region"]),
    "Temporal-Lobe": (True, ["temporal lobe", "temporal region", "temporal lobar region"]),
    "Occipital-Lobe": (True, ["occipital lobe", "occipital region", "occipital lobar region"]),
    "Insula-Lobe": (True, ["insula", "insular cortex", "insular lobe", "island of Reil"]),
    "Cingulate-Lobe": (True, ["cingulate cortex", "cingulate gyrus", "cingulum cortex", "limbic cingulate"]),
    "Middle-Frontal-Gyrus": (True, ["middle frontal gyrus", "MFG", "middle frontal convolution"]),
    "Inferior-Frontal-Gyrus": (True, ["inferior frontal gyrus", "IFG", "inferior frontal convolution"]),
    "Anterior-Cingulate": (True, ["anterior cingulate cortex", "anterior cingulate", "ACC"]),
    "Orbitofrontal-Cortex": (True, ["orbitofrontal cortex", "orbitofrontal region", "OFC"]),
    "ctx-superiorfrontal": (True, ["superior frontal gyrus", "SFG", "superior frontal convolution"]),
    "ctx-precentral": (True, ["precentral gyrus", "primary motor cortex", "motor strip"]),
    "ctx-postcentral": (True, ["postcentral gyrus", "primary somatosensory cortex", "sensory strip"]),
    "ctx-paracentral": (True, ["paracentral lobule", "paracentral cortex", "paracentral region"]),
    "ctx-superiorparietal": (True, ["superior parietal lobule", "superior parietal cortex", "SPL"]),
    "ctx-inferiorparietal": (True, ["inferior parietal lobule", "inferior parietal cortex", "IPL"]),
    "ctx-supramarginal": (True, ["supramarginal gyrus", "supramarginal cortex", "SMG"]),
    "ctx-precuneus": (True, ["precuneus", "precuneal cortex", "medial parietal cortex"]),
    "ctx-superiortemporal": (True, ["superior temporal gyrus", "STG", "superior temporal convolution"]),
    "ctx-middletemporal": (True, ["middle temporal gyrus", "MTG", "middle temporal convolution"]),
    "ctx-inferiortemporal": (True, ["inferior temporal gyrus", "ITG", "inferior temporal convolution"]),
    "ctx-fusiform": (True, ["fusiform gyrus", "fusiform cortex", "occipitotemporal gyrus"]),
    "ctx-parahippocampal": (True, ["parahippocampal gyrus", "parahippocampal cortex", "parahippocampal region"]),
    "ctx-entorhinal": (True, ["entorhinal cortex", "entorhinal area", "entorhinal region"]),
    "ctx-temporalpole": (True, ["temporal pole", "temporopolar cortex", "anterior temporal pole"]),
    "ctx-lateraloccipital": (True, ["lateral occipital cortex", "lateral occipital gyrus", "LOC"]),
    "ctx-lingual": (True, ["lingual gyrus", "lingual cortex", "medial occipitotemporal gyrus"]),
    "ctx-cuneus": (True, ["cuneus", "cuneal cortex", "cuneate lobule"]),
    "ctx-pericalcarine": (True, ["pericalcarine cortex", "calcarine cortex", "primary visual cortex"]),
    "ctx-insula": (True, ["insular gyri", "insular cortex parcel", "insula parcel"]),
    "ctx-lateralorbitofrontal": (True, ["lateral orbitofrontal cortex", "lateral OFC", "lateral orbital gyrus"]),
    "ctx-medialorbitofrontal": (True, ["medial orbitofrontal cortex", "medial OFC", "gyrus rectus region"]),
    "ctx-parsopercularis": (True, ["pars opercularis", "opercular part of the inferior frontal gyrus", "Broca's area (opercular)"]),
    "ctx-parstriangularis": (True, ["pars triangularis", "triangular part of the inferior frontal gyrus", "triangular IFG"]),
    "ctx-isthmuscingulate": (True, ["isthmus cingulate", "cingulate isthmus", "isthmus of the cingulate gyrus"]),
    "ctx-posteriorcingulate": (True, ["posterior cingulate cortex", "posterior cingulate", "PCC"]),
    "ctx-transversetemporal": (True, ["transverse temporal gyrus", "Heschl's gyrus", "primary auditory cortex"]),
    "ctx-bankssts": (True, ["banks of the superior temporal sulcus", "STS banks", "superior temporal sulcus banks"]),
    "ctx-caudalanteriorcingulate": (True, ["caudal anterior cingulate", "caudal ACC", "caudal anterior cingulate cortex"]),
    "ctx-rostralanteriorcingulate": (True, ["rostral anterior cingulate", "rostral ACC", "rostral anterior cingulate cortex"]),
    "ctx-caudalmiddlefrontal": (True, ["caudal middle frontal gyrus", "caudal MFG", "posterior middle frontal gyrus"]),
    "ctx-rostralmiddlefrontal": (True, ["rostral middle frontal gyrus", "rostral MFG", "anterior middle frontal gyrus"]),
    "ctx-frontalpole": (True, ["frontal pole", "frontopolar cortex", "anterior frontal pole"]),
    "ctx-parsorbitalis": (True, ["pars orbitalis", "orbital part of the inferior frontal gyrus", "orbital IFG"]),
    "Angular-Gyrus": (True, ["angular gyrus", "angular cortex", "gyrus angularis"]),
    "Supplementary-Motor-Cortex": (True, ["supplementary motor area", "SMA", "supplementary motor cortex"]),
    "Planum-Temporale": (True, ["planum temporale", "temporal plane", "posterior superior temporal plane"]),
    "Planum-Polare": (True, ["planum polare", "polar plane", "anterior superior temporal plane"]),
    "Occipital-Pole": (True, ["occipital pole", "occipital polar cortex", "posterior occipital pole"]),
    "Paracingulate-Gyrus": (True, ["paracingulate gyrus", "paracingulate cortex", "paracingulate region"]),
    "Frontal-Operculum": (True, ["frontal operculum", "frontal opercular cortex", "opercular frontal region"]),
    "Parietal-Operculum": (True, ["parietal operculum", "parietal opercular cortex", "opercular parietal region"]),
    "Central-Operculum": (True, ["central operculum", "central opercular cortex", "rolandic operculum"]),
    "Subcallosal-Cortex": (True, ["subcallosal cortex", "subcallosal area", "subgenual cortex"]),
    "Intracalcarine-Cortex": (True, ["intracalcarine cortex", "intracalcarine region", "calcarine sulcus cortex"]),
    "Supracalcarine-Cortex": (True, ["supracalcarine cortex", "supracalcarine region", "cortex above the calcarine"]),
    "choroid-plexus": (True, ["choroid plexus", "choroidal plexus", "plexus choroideus"]),
    "ACA-Territory": (True, ["ACA territory", "anterior cerebral artery territory", "ACA vascular territory"]),
    "MCA-Territory": (True, ["MCA territory", "middle cerebral artery territory", "MCA vascular territory"]),
    "PCA-Territory": (True, ["PCA territory", "posterior cerebral artery territory", "PCA vascular territory"]),
    "Brain-Stem": (False, ["brainstem", "brain stem", "truncus cerebri"]),
    "Optic-Chiasm": (False, ["optic chiasm", "chiasm", "optic chiasma"]),
    "CC_Anterior": (False, ["genu of the corpus callosum", "callosal genu", "anterior corpus callosum"]),
    "CC_Posterior": (False, ["splenium of the corpus callosum", "callosal splenium", "posterior corpus callosum"]),
    "CC_Central": (False, ["body of the corpus callosum", "callosal body (central)", "central corpus callosum"]),
    "Skull": (False, ["skull", "calvarium", "cranial bone", "bony skull"]),
    "Dura": (False, ["dura", "dura mater", "dural layer"]),
    "CSF-ExtraCerebral": (False, ["extra-axial CSF", "subarachnoid CSF", "extracerebral cerebrospinal fluid"]),
    "Head-ExtraCerebral": (False, ["scalp", "scalp soft tissue", "extracranial soft tissue"]),
    "Intracranial": (False, ["intracranial space", "intracranial cavity", "skull cavity", "cranial cavity"]),
    "Cerebral-White-Matter-All": (False, ["cerebral white matter", "all cerebral white matter", "total white matter"]),
    "Cerebrum-All": (False, ["cerebrum", "both cerebral hemispheres", "telencephalon"]),
    "Frontal-Lobe-All": (False, ["frontal lobes", "both frontal lobes", "bilateral frontal lobes"]),
    "Temporal-Lobe-All": (False, ["temporal lobes", "both temporal lobes", "bilateral temporal lobes"]),
    "3rd-Ventricle": (False, ["third ventricle", "3rd ventricle", "ventriculus tertius"]),
    "4th-Ventricle": (False, ["fourth ventricle", "4th ventricle", "ventriculus quartus"]),
    "Corpus-Callosum": (False, ["corpus callosum", "callosal body", "callosum", "callosal commissure"]),
    "Ventricles": (False, ["ventricular system", "ventricles", "cerebral ventricles", "ventricular spaces"]),
    "Lateral-Ventricles": (False, ["lateral ventricles", "both lateral ventricles", "paired lateral ventricles"]),
    "Brain": (False, ["brain", "whole brain", "brain parenchyma", "encephalon"]),
    "Cerebellum-All": (False, ["cerebellum", "whole cerebellum", "cerebellar hemispheres"]),
    "Cerebral-Cortex-All": (False, ["cerebral cortex", "whole cortex", "cortical ribbon"]),
}

#: How ``Anatomy.structure`` spells a (side, key) pair.
def structure_name(key: str, side: str | None) -> str:
    """The synth structure name of an anatomy key on a side (``None`` for midline keys)."""
    special = {"Cerebellum-All": "Cerebellum", "Cerebral-Cortex-All": "Cerebral-Cortex",
               "Cerebral-White-Matter-All": "Cerebral-White-Matter", "Cerebrum-All": "Cerebrum",
               "Frontal-Lobe-All": "Frontal-Lobe", "Temporal-Lobe-All": "Temporal-Lobe"}
    if key in special:
        return special[key]
    if side is None:
        return key
    if side == "both":
        return f"Bilateral-{key}"
    S = "Left" if side == "left" else "Right"
    if key.startswith("ctx-"):
        return f"ctx-{'lh' if side == 'left' else 'rh'}-{key[4:]}"
    if key == "Hemisphere":
        return f"{S}-Hemisphere"
    return f"{S}-{key}"


SIDE_PREFIX = {"left": ["left", "left-sided"], "right": ["right", "right-sided"]}
BOTH_SIDES = ["the left and right {t}", "both {t}", "the bilateral {t}", "the {t} on both sides", "the {t} (left and right)"]
#: abbreviations users type; applied at a low rate to sampled prompts (grammar.abbreviate)
ABBREVIATIONS = {"left": "lt", "right": "rt", "hippocampus": "hippo", "ventricle": "vent", "volume": "vol",
                 "segment": "seg", "segmentation": "seg", "lesion": "lsn", "compute": "calc",
                 "frontal": "front.", "temporal": "temp.", "white matter": "WM", "gray matter": "GM",
                 "cerebrospinal fluid": "CSF", "anterior-posterior": "AP", "superior-inferior": "SI"}
SIDE_SUFFIX = {
    "left": ["on the left", "in the left hemisphere", "(left)", "on the left side"],
    "right": ["on the right", "in the right hemisphere", "(right)", "on the right side"],
}

LOBE_ADJ = {"frontal": "frontal", "parietal": "parietal", "temporal": "temporal", "occipital": "occipital",
            "insula": "insular", "cingulate": "cingulate"}
LOBE_PHRASE = {"frontal": "frontal lobe", "parietal": "parietal lobe", "temporal": "temporal lobe",
               "occipital": "occipital lobe", "insula": "insula", "cingulate": "cingulate gyrus"}

# ------------------------------------------------------------------ lesions
# The ontology (class -> parents, nearest first: glioma -> neoplasm -> mass -> lesion) travels
# with each lesion's metadata (``meta["ontology"]``, set by synth.lesions); every class and
# parent needs an entry in LESION_TERMS below.

#: term -> synonyms (canonical first). Used for classes and ontology parents alike.
LESION_TERMS: dict[str, list[str]] = {
    "glioma": ["glioma", "glial tumor", "glial neoplasm", "glioma mass"],
    "meningioma": ["meningioma", "meningeal tumor", "dural-based tumor", "meningioma mass"],
    "metastasis": ["metastasis", "metastatic lesion", "metastatic deposit", "secondary tumor"],
    "edema": ["edema", "oedema", "vasogenic edema", "perilesional swelling"],
    "infarct": ["infarct", "infarction", "ischemic infarct", "ischemic lesion"],
    "wmh": ["white matter hyperintensities", "WMH", "white matter lesions", "leukoaraiosis"],
    "hemorrhage": ["hemorrhage", "haemorrhage", "bleed", "hematoma"],
    "cyst": ["cyst", "cystic lesion", "fluid-filled cyst", "cystic cavity"],
    "resection_cavity": ["resection cavity", "surgical cavity", "postoperative cavity", "resection bed"],
    "neoplasm": ["neoplasm", "tumor", "tumour", "neoplastic lesion"],
    "mass": ["mass", "mass lesion", "space-occupying lesion", "growth"],
    "stroke": ["stroke", "stroke lesion", "ischemic stroke", "cerebral infarction"],
    "bleed": ["bleed", "blood", "intracranial bleed", "hemorrhagic lesion"],
    "hyperintensity": ["hyperintensity", "hyperintense lesion", "bright lesion", "hyperintense foci"],
    "cavity": ["cavity", "cavitation", "fluid cavity", "empty cavity"],
    "lesion": ["lesion", "abnormality", "pathology", "abnormal region"],
}

#: canonical answer phrase per class
CLASS_NAME = {"glioma": "glioma", "meningioma": "meningioma", "metastasis": "metastasis", "edema": "edema",
              "infarct": "infarct", "wmh": "white matter hyperintensity", "hemorrhage": "hemorrhage",
              "cyst": "cyst", "resection_cavity": "resection cavity"}

COMPONENT_TERMS = {
    "enhancing": ["enhancing component", "enhancing rim", "enhancing tissue", "enhancing portion"],
    "necrotic": ["necrotic core", "necrotic component", "necrosis", "non-enhancing core"],
    "edema": ["surrounding edema", "peritumoral edema", "edema component", "perilesional edema"],
    "core": ["solid core", "tumor core", "solid component", "solid tissue component"],
    "cystic": ["cystic component", "cystic portion", "cystic part", "fluid component"],
}

#: signal adjectives by imaging kind (CT says density, MR says intensity)
SIGNAL_ADJ = {
    "hyper": {"mr": ["hyperintense", "bright"], "ct": ["hyperdense", "high-density"]},
    "hypo": {"mr": ["hypointense", "dark"], "ct": ["hypodense", "low-density"]},
    "iso": {"mr": ["isointense"], "ct": ["isodense"]},
}

ACUITY_ADJ = {"acute": ["acute", "recent"], "subacute": ["subacute"], "chronic": ["chronic", "old"]}

#: modality names: kernel-variable stem, metadata modality, prompt words
MODALITIES = {
    "t1": ("T1w", ["T1", "T1-weighted", "T1w"]),
    "t2": ("T2w", ["T2", "T2-weighted", "T2w"]),
    "flair": ("FLAIR", ["FLAIR", "T2 FLAIR", "fluid-attenuated"]),
    "pd": ("PD", ["PD", "proton density", "PD-weighted"]),
    "dwi": ("DWI", ["DWI", "diffusion-weighted", "diffusion"]),
    "adc": ("ADC", ["ADC", "ADC map", "apparent diffusion coefficient"]),
    "gre": ("GRE", ["GRE", "gradient echo", "T2*"]),
    "swi": ("SWI", ["SWI", "susceptibility-weighted", "SWI"]),
    "t1c": ("T1c", ["post-contrast T1", "T1 post-gad", "contrast-enhanced T1"]),
    "ct": ("CT", ["CT", "head CT", "computed tomography"]),
}

#: synth contrast name -> kernel variable stem
CONTRAST_STEM = {"t1w": "t1", "t2w": "t2", "flair": "flair", "pd": "pd", "dwi": "dwi", "adc": "adc",
                 "gre": "gre", "swi": "swi", "t1c": "t1c", "ct": "ct"}


def is_ct(stem: str) -> bool:
    return stem == "ct"
