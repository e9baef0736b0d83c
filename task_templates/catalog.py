"""The task catalog (seeds/004 Table 1): 17 categories, their prompt templates and programs.

Each category has prompt templates (see :mod:`task_templates.grammar`) and a builder that, for
a case, chooses ROIs, writes the ground-truth program (code steps with ``<MOD>`` markers and
``print`` of intermediate values), the vision calls with their truth targets, and the expected
results computed directly from the truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import voxel_lib as vl

from .api import empty_mask_answer
from .case import ROI, Case
from .describe import (NOT_FOUND_ANSWER, anatomy_canonical, describe_absent, describe_anatomy, describe_lesion,
                       location_answer, territory_answer, var_name)
from .example import MOD, Step, VisionCall
from .grammar import expand, pick
from .terms import ANATOMY, COMPONENT_TERMS, MODALITIES

# ----------------------------------------------------------------------------- templates
T = {}
T["segmentation"] = [
    "{segment|delineate|outline|contour|label} {roi}",
    "{derive|compute|generate|produce|create} a {segmentation|mask|label map} of {roi}",
    "can you {show me|highlight|mark|find} {roi}?",
    "{please |}{segment|delineate} {roi} [in this scan]",
    "{highlight|isolate|extract} {roi} [on the image]",
    "i need a {mask|segmentation} {of|for} {roi}",
    "where exactly is {roi}? {segment|outline} it",
    "{draw|trace} the {boundary|outline|contour} of {roi}",
    "{compute|derive} a {roi_bare} {segmentation|mask}",
    "{show|display} {roi} as a {mask|segmentation}",
    "{auto-segment|automatically segment} {roi}",
    "give me the {voxels|region} {of|belonging to} {roi}",
]
T["volume"] = [
    "{what is|what's|determine|compute|calculate|estimate|measure} the {volume|size} of {roi}[?]",
    "how {big|large} is {roi}?",
    "{estimate|quantify|report} {roi} volume",
    "{compute|calculate} the volume {of|occupied by} {roi} in {mL|milliliters|cc}",
    "how much {space|volume} does {roi} {occupy|take up}?",
    "{give me|tell me} the {total |}volume of {roi}",
    "{can you |could you |}measure the {volume|size} of {roi}?",
    "{volumetry|volumetric analysis} of {roi}",
    "what {volume|size} is {roi}?",
    "{quantify|measure} {roi} {size|volume} [please]",
]
T["volume_change"] = [
    "how much has {roi} {changed|progressed|grown|shrunk} [between the {scans|sessions|exams}]?",
    "{compute|determine|quantify|calculate} the {volume change|change in volume} of {roi} [over time]",
    "{evaluate|assess|measure} {total |}{volume|size} change of {roi} [over time|between sessions]",
    "has {roi} {grown|increased in size|gotten bigger|shrunk|decreased}? by how much?",
    "what is the {growth|progression|volumetric change} of {roi} {over time|between the two scans|from the first to the second exam}?",
    "{quantify|report} {the |}{growth|progression} of {roi}",
    "{longitudinal|interval} volume change of {roi}",
    "how did the {volume|size} of {roi} change {between visits|over the interval|over time}?",
    "what is the annual {rate of change|change} in {volume|size} of {roi}?",
    "{track|follow} the {volume|size} of {roi} across {sessions|exams|visits}",
]
T["volume_comparison"] = [
    "{compute|calculate|determine|what is} the {bilateral |left-right |}{volume |}asymmetry of {roi_pair}[?]",
    "{is|are} {roi_pair} {asymmetric|symmetric}? {quantify|compute} the asymmetry",
    "{compare|contrast} the {volumes|sizes} of the left and right {roi_bare}",
    "{derive|compute} {the |}volume difference between left and right {roi_bare}",
    "{asymmetry index|laterality index|volume asymmetry} {of|for} {roi_pair}",
    "how {different|asymmetric} are the left and right {roi_bare} in {volume|size}?",
    "{which|what} side {of|for} {roi_pair} is larger, and by how much?",
    "{left vs right|left versus right|L/R} {volume |}comparison {of|for} {roi_pair}",
]
T["volume_comparison_pair"] = [
    "{compare|contrast} the {volume|size} of {roi} {to|with|and} {roi2}",
    "how does {roi} compare {to|with} {roi2} in {volume|size}?",
    "{compute|calculate|what is} the volume {ratio|difference} {of|between} {roi} {to|and} {roi2}[?]",
    "is {roi} larger than {roi2}? by how much?",
    "{derive|compute} {the |}volume difference between {roi} and {roi2}",
    "what is the {size|volume} of {roi} relative to {roi2}?",
]
T["relative_volume"] = [
    "what {percent|percentage|fraction|proportion} of {roi} is {part}?",
    "{compute|calculate|determine} the {percentage|fraction|share} of {roi} {that is|occupied by|made up of} {part}",
    "how much of {roi} is {part}[, in percent]?",
    "{measure|quantify} {part} as a {percentage|fraction} of {roi}",
    "{relative|fractional} volume of {part} {within|in} {roi}",
    "what share of {roi} does {part} {occupy|take up|account for}?",
    '{compute|determine} how much of {roi} {consists of|is composed of} {part}',
    '{percent|percentage} {volume |}of {part} {in|within} {roi}',
    '{estimate|what is} the {proportion|fraction} {of|that} {part} {makes up of|represents in} {roi}[?]',
    '{give me|report} the {part_short} {fraction|percentage} of {roi}',
]
T["extent"] = [
    "{what is|what's|compute|measure|determine} the {axis} of {roi}[?]",
    "how {axis_adj} is {roi}?",
    "{measure|give me|report} {roi} {axis}",
    "{estimate|calculate} the {axis} {of|for} {roi} in {mm|millimeters}",
    "{what is|determine} the {axis} {of|for} {roi}[?]",
    "{can you |}{measure|compute} the maximum {axis} of {roi}?",
]
T["extent_box"] = [
    "{compute|what are|measure|determine} the {dimensions|bounding box dimensions|3D extent} of {roi}[?]",
    "how {big|large} is {roi} in each direction?",
    "{give me|report} the {width, length and height|extents|bounding box} of {roi}",
    "{measure|estimate} {roi} {dimensions|extent in all three axes}",
    "{compute|derive} the {bounding box|box dimensions} {of|for} {roi}",
]
T["extent_change"] = [
    "how much has {roi} {axis_verb}?",
    "{compute|determine|measure} the change in {axis} of {roi} [over time|between sessions]",
    "what is the change in {axis} of {roi}[ between the {scans|sessions}]?",
    "has the {axis} of {roi} changed? by how much?",
    "{longitudinal|interval} change in {axis} of {roi}",
    "{quantify|report} how the {axis} of {roi} changed",
    '{did|has} {roi} {grow|expand|shrink} {along|in} {axis}? {quantify|measure} it',
    '{compute|calculate} the difference in {axis} of {roi} between the {first|earlier} and {last|later} {scan|session}',
    '{interval|serial} {axis} change {of|for} {roi}',
    'by how many {mm|millimeters} has the {axis} of {roi} changed?',
]
T["center_of_mass"] = [
    "{locate|find|compute|determine} the {center of mass|centroid|centre of mass} of {roi}",
    "{what is|where is} the {centroid|center of mass|center} of {roi}[?]",
    "{give me|report} the {world |RAS |}coordinates of {roi} {centroid|center}",
    "{compute|calculate} {roi} {centroid|center of mass} [in world coordinates]",
    "at what {coordinates|position} is the {center|centroid} of {roi}?",
    "{find|get} the {centroid|center of gravity} of {roi}",
    '{where|at which RAS coordinates} is {roi} centered?',
    '{compute|derive} the {spatial |}{centroid|barycenter} of {roi}',
    '{give|report} the {center|centroid} position of {roi} in {mm|millimeters}',
    '{localize|pinpoint} the {centroid|center of mass} of {roi} in world space',
]
T["intensity"] = [
    "{compute|what is|measure|determine} the mean {signal|intensity|value} of {roi} on {img}[?]",
    "{compute|measure} the {mean|average} {density|attenuation} of {roi}",
    "how {bright|intense} is {roi} on {img}?",
    "{average|mean} {img} {intensity|signal} {in|within} {roi}",
    "{report|give me} the {mean|average} intensity {of|in} {roi} [on {img}]",
    "{what is|measure} the {signal|intensity} {level|value} of {roi} {on|in} {img}[?]",
    '{what is|compute} the {average|mean} {img} {value|signal} {inside|within} {roi}[?]',
    '{measure|report} {mean|average} {signal|intensity} {in|of} {roi} {on|from} {the |}{img}',
    '{quantify|get} the {img} {signal|intensity} of {roi}',
    '{compute|what is} the {mean|average} {density|attenuation} {in|of} {roi} in {HU|Hounsfield units}[?]',
]
T["intensity_comparison"] = [
    "how {hyperintense|bright|hypointense|dark} is {roi} relative to {roi2}[ on {img}]?",
    "{compute|calculate} the relative {intensity|signal|hyperintensity|hypointensity} of {roi} {to|compared to} {roi2}",
    "{compare|contrast} the {img} signal of {roi} {with|to} {roi2}",
    "what is the {intensity|signal} ratio of {roi} to {roi2}[ on {img}]?",
    "{quantify|measure} the {signal|intensity} {difference|contrast} between {roi} and {roi2}",
    "how does {roi} compare {to|with} {roi2} in {signal|intensity|brightness}?",
    '{what is|compute} the {contrast|signal ratio} between {roi} and {roi2}[ on {img}]?',
    'is {roi} {brighter|darker} than {roi2}[ on {img}]? by how much?',
    '{compute|derive} {roi} {signal|intensity} relative to {roi2}',
    '{relative|normalized} {signal|intensity} of {roi} {with respect to|against} {roi2}',
]
T["intensity_change"] = [
    "{determine|compute|quantify} {progressive |}signal {loss|change} of {roi}[ on {img}]",
    "how has the {signal|intensity} of {roi} changed[ between the {scans|sessions}]?",
    "has {roi} {signal|intensity} {increased|decreased|changed}?",
    "{compute|measure} the change in mean {img} {signal|intensity} of {roi}",
    "{longitudinal|interval} {signal|intensity} change {of|in} {roi}",
    "what is the change in {brightness|signal intensity} of {roi} over time?",
    '{compute|quantify} the {interval|longitudinal} {img} signal change {in|of} {roi}',
    '{did|has} the {mean |}{signal|intensity} of {roi} {drop|decrease|increase|change} over time?',
    '{report|give me} the change in {average|mean} {signal|intensity} of {roi} between {scans|sessions|visits}',
    'how much has {roi} {brightened|darkened|changed in signal}[ on {img}]?',
]
T["location"] = [
    "where is {roi}?",
    "{estimate|determine|identify|describe} the {anatomical |}location of {roi}",
    "in which {lobe|region|part of the brain} is {roi}[ located]?",
    "{localize|locate} {roi}",
    "what is the location of {roi}?",
    "{which|what} {brain region|lobe|structure} {contains|harbors} {roi}?",
    "{tell me|report} where {roi} is",
]
T["territory"] = [
    "what is the vascular territory of {roi}?",
    "{which|what} {arterial|vascular} territory {does|is} {roi} {involve|in}?",
    "{determine|identify} the {vascular|arterial} territory of {roi}",
    "which artery supplies the region of {roi}?",
]
T["enhancement"] = [
    "does {roi} enhance {post contrast|after contrast|with gadolinium}?",
    "is {roi} {enhancing|contrast-enhancing}?",
    "{characterize|assess|describe} the {contrast |}enhancement of {roi}",
    "{is there|do you see} {enhancement|contrast uptake} {in|of} {roi}?",
    "does {roi} take up contrast?",
    "{evaluate|check} {post-contrast|gadolinium} enhancement of {roi}",
    '{does|did} {roi} show {contrast |}enhancement?',
    '{is|was} {roi} {enhancing|bright} on the post-contrast {scan|T1|image}?',
    '{compare|check} {roi} {before and after|pre and post} contrast',
    '{any|is there} {gadolinium|contrast} enhancement {in|of} {roi}?',
]
T["restriction"] = [
    "does {roi} restrict diffusion?",
    "is there {restricted diffusion|diffusion restriction} in {roi}?",
    "{assess|evaluate|check} {roi} for {restricted diffusion|diffusion restriction}",
    "{is|does} {roi} {diffusion-restricting|show restricted diffusion}?",
    "{characterize|describe} the diffusion {properties|signal} of {roi}",
    "{do the DWI and ADC|does the diffusion imaging} show restriction in {roi}?",
    '{is|does} {roi} {bright on DWI and dark on ADC|DWI bright with low ADC}?',
    '{check|assess} {roi} for {low ADC|restricted diffusion}',
    'does {roi} show {true |}diffusion restriction?',
    '{evaluate|describe} {roi} on {DWI and ADC|diffusion imaging}',
]
T["signal"] = [
    "{characterize|describe} {the |}signal {properties|characteristics} of {roi}",
    "what are {the |}signal characteristics of {roi}?",
    "{characterize|describe} the {density|intensity|signal} of {roi}",
    "is {roi} hyperintense, hypointense or isointense?",
    "how does {roi} appear on {the |}{available |}{sequences|images|scans}?",
    "{describe|report} {roi} signal on each {sequence|image}",
    '{report|give} the signal {pattern|profile} of {roi}',
    '{describe|characterize} how {roi} {looks|appears} on each {sequence|contrast}',
    '{is|how} {roi} {hyper- or hypointense|bright or dark} on the {available |}images?',
    '{signal|intensity} {characterization|characteristics} of {roi}',
]
T["cropping"] = [
    "crop the {image|scan|volume} {around|to} {roi}",
    "crop {img} to {roi} with a {margin} mm margin",
    "{crop|cut} {margin} mm around {roi}",
    "{extract|give me} a {crop|cropped volume|sub-volume} around {roi}[ with {margin} mm {margin_word}]",
    "crop the image to {roi}",
    "{restrict|reduce} the field of view to {roi}[ plus {margin} mm]",
    '{crop|trim} {img} around {roi}[ with {margin} mm {margin_word}]',
    '{make|create} a {cropped|tight} {image|volume} {around|of} {roi}',
    '{zoom|crop} {in on|to} {roi}[ leaving {margin} mm]',
    '{extract|cut out} {roi} {region|area} from {img}[ with {margin} mm {margin_word}]',
]
T["tissue_removal"] = [
    "{remove|strip|erase|mask out} {roi} signal from the {image|scan}",
    "{remove|delete|zero out} {roi} from {img}",
    "strip signal that is not {roi}",
    "{keep only|isolate only|retain only} {roi} {signal|in the image}",
    "{mask|blank} everything except {roi}",
    "{remove|suppress} the signal of {roi}",
    '{remove|erase|wipe out} {roi} from the {image|scan|volume}',
    '{set|zero} {roi} {voxels|signal} to zero in {img}',
    '{mask out|remove} {roi} [signal] {in|from} {img}',
    '{delete|subtract} {roi} signal',
]

AXES = {
    "lr": (["lateral width", "left-right extent", "transverse width", "width", "lateral extent"], "wide"),
    "ap": (["anterior-posterior length", "AP extent", "front-to-back length", "length", "anteroposterior dimension"], "long"),
    "si": (["superior-inferior height", "craniocaudal extent", "vertical height", "height", "SI extent"], "tall"),
}
AXIS_VERBS = {"lr": ["widened", "changed in width"], "ap": ["lengthened", "changed in length"],
              "si": ["grown in height", "changed in height"]}
#: removal templates that keep (not remove) the ROI
KEEP_TEMPLATES = {2, 3, 4}

CATEGORIES = ["segmentation", "volume", "volume_change", "volume_comparison", "relative_volume", "extent",
              "extent_change", "center_of_mass", "intensity", "intensity_comparison", "intensity_change",
              "location", "enhancement", "restriction", "signal", "cropping", "tissue_removal"]


#: Absent targets (seeds/004: an empty mask when the prompted target is not in the images): the
#: share of lesion draws, in the builders that support them (segmentation, volume, location and
#: territory, tissue removal), that describe a lesion the case does not have instead. Its
#: segment() target is an empty mask, its volume 0 mL, its location answer NOT_FOUND_ANSWER.
#: Lesion-free cases take part at the same rate (see :meth:`Builder.any_roi`, :meth:`Builder.choose_lesion`).
ABSENT_PROB = 0.12
#: share of absent location draws asked as a vascular-territory question
ABSENT_TERRITORY_SHARE = 0.2


class Skip(Exception):
    """This case cannot support the requested task (e.g. no lesion, one session).

    ``final=True``: retrying the category on this case would only bias its draws (a lesion-free
    case declined the absent-target draw), so the sampler gives up at once.
    """

    def __init__(self, message: str = "", final: bool = False):
        super().__init__(message)
        self.final = final


class PromptOnly(Exception):
    """Raised by :meth:`Builder.prompt` in prompt-only mode, carrying the prompt (for statistics)."""

    def __init__(self, prompt: str):
        super().__init__(prompt)
        self.prompt = prompt


#: template groups of each category
TEMPLATE_GROUPS = {c: [c] for c in [
    "segmentation", "volume", "volume_change", "relative_volume", "extent_change", "center_of_mass",
    "intensity", "intensity_comparison", "intensity_change", "enhancement", "restriction", "signal",
    "cropping", "tissue_removal"]}
TEMPLATE_GROUPS.update({"volume_comparison": ["volume_comparison", "volume_comparison_pair"],
                        "extent": ["extent", "extent_box"], "location": ["location", "territory"]})


@dataclass
class Draft:
    """A category builder's output before execution."""

    prompt: str
    steps: list[str]
    vision_calls: list[VisionCall]
    answer: str | None = None
    measurements: dict = field(default_factory=dict)   # name -> (value, unit), from the truth
    outputs: dict = field(default_factory=dict)        # name -> Volume, from the truth
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers
class Builder:
    """Shared machinery: ROI choice, descriptions, segment calls with truth targets."""

    def __init__(self, case: Case, rng: np.random.Generator, split: str, prompt_only: bool = False):
        self.case, self.rng, self.split = case, rng, split
        self.prompt_only = prompt_only
        self.calls: list[VisionCall] = []
        self.template_ids: list[str] = []
        self.absent: dict[ROI, tuple[str, dict]] = {}   # absent ROI -> (phrase, spec)

    def pick(self, options):
        return pick(options, self.rng, self.split)

    def prompt(self, category: str, slots: dict, subset: list[int] | None = None) -> str:
        templates = T[category]
        idx = list(range(len(templates))) if subset is None else subset
        from .grammar import heldout_flags
        flags = heldout_flags([templates[i] for i in idx])
        if self.split in ("train", "eval"):
            pool = [i for i, f in zip(idx, flags) if f == (self.split == "eval")] or idx
        else:
            pool = idx
        i = pool[int(self.rng.integers(len(pool)))]
        self.template_ids.append(f"{category}:{i}")
        self.last_template = i
        text = expand(templates[i], slots, self.rng, self.split)
        if self.prompt_only:
            raise PromptOnly(text)
        return text

    # ---- ROIs
    def anatomy_rois(self, session: int = 0, bilateral_only: bool = False) -> list[ROI]:
        key = ("anatomy_rois", session, bilateral_only)
        if key in self.case._cache:
            return self.case._cache[key]
        out = []
        for key, (bilateral, _) in ANATOMY.items():
            if bilateral_only and not bilateral:
                continue
            for side in (("left", "right") if bilateral else (None,)):
                roi = ROI("anatomy", key, side)
                if self.case.present(roi, session):
                    out.append(roi)
        self.case._cache[key] = out
        return out

    def choose_anatomy(self, session: int = 0, bilateral_only: bool = False, both_share: float = 0.0) -> ROI:
        """A random anatomical ROI; with probability ``both_share`` a bilateral one (left + right)."""
        rois = self.anatomy_rois(session, bilateral_only)
        if not rois:
            raise Skip("no anatomical ROI present")
        roi = rois[int(self.rng.integers(len(rois)))]
        if both_share and roi.side is not None and self.rng.random() < both_share:
            other = ROI("anatomy", roi.key, "right" if roi.side == "left" else "left")
            if other in rois:
                roi = ROI("anatomy", roi.key, "both")
        return roi

    def lesions(self, session: int = 0, need: Callable[[dict], bool] | None = None) -> list[dict]:
        metas = [l.meta for l in self.case.sessions[session].lesions]
        return [m for m in metas if (need is None or need(m))
                and self.case.present(ROI("lesion", str(m["id"])), session)]

    def choose_lesion(self, session: int = 0, need=None, absent: bool = False) -> tuple[ROI, dict | None]:
        """A random present lesion; with ``absent``, an absent target (meta None) with probability ABSENT_PROB.

        With ``absent`` on a case without a suitable lesion, the absent draw is the only option:
        a declined draw raises a final Skip so that retries do not inflate the absent rate.
        """
        if absent and self.rng.random() < ABSENT_PROB:
            return self.absent_roi(session), None
        cands = self.lesions(session, need)
        if not cands:
            raise Skip("no suitable lesion", final=absent)
        m = cands[int(self.rng.integers(len(cands)))]
        return ROI("lesion", str(m["id"])), m

    def absent_roi(self, session: int = 0, signal_stem: str | None = None) -> ROI:
        """A lesion the case does not have (in any session), described like a real one.

        The description is checked against every lesion of every session
        (:func:`task_templates.describe.describe_absent`); :meth:`describe` returns it.
        """
        stem = signal_stem or self.rng.choice(self.case.stems(session))
        got = describe_absent(self.case.lesion_sites(), self.rng, self.split, signal_stem=stem)
        if got is None:
            raise Skip("no absent target can be described")
        phrase, spec = got
        roi = ROI("absent", spec["noun"])
        self.absent[roi] = (phrase, spec)
        return roi

    def describe(self, roi: ROI, session: int = 0, signal_stem: str | None = None) -> tuple[str, str]:
        """(prompt phrase, variable name) for an ROI."""
        if roi.kind == "anatomy":
            return describe_anatomy(roi.key, roi.side, self.rng, self.split), var_name(anatomy_canonical(roi.key, roi.side))
        if roi.kind == "absent":
            return self.absent[roi][0], "lesion"
        metas = [l.meta for l in self.case.sessions[session].lesions]
        target = next(m for m in metas if str(m["id"]) == roi.key)
        stem = signal_stem or self.rng.choice(self.case.stems(session))
        phrase = describe_lesion(target, metas, self.rng, self.split, signal_stem=stem, component=roi.component)
        if phrase is None:
            raise Skip("lesion cannot be singled out")
        return phrase, ("lesion" if roi.component is None else f"{roi.component}_component")

    # ---- code
    def args(self, session: int, stems: list[str] | None = None) -> tuple[str, list[str]]:
        acqs = self.case.sessions[session].acquisitions
        if stems is not None:
            acqs = [a for a in acqs if a.stem in stems]
        names = [a.name for a in acqs]
        return ", ".join(f"{n}{MOD}" for n in names), names

    def segment(self, roi: ROI, var: str, sessions: list[int], step: int, stems=None) -> str:
        """Code for one segment call over the given sessions; registers the vision call."""
        parts, names, targets = [], [], []
        for s in sessions:
            a, n = self.args(s, stems)
            parts.append(a)
            names += n
            first = next(x for x in self.case.sessions[s].acquisitions if x.name == n[0])
            t = self.case.truth(roi, s, first.volume)
            if roi.kind != "absent" and (t is None or int(t.tensor.sum()) == 0):
                raise Skip(f"{roi.label} absent in session {s}")
            targets.append(t)
        self.calls.append(VisionCall("segment", step, names, targets, roi.label))
        if len(sessions) == 1:
            return f"{var} = segment({', '.join(parts)})"
        lhs = ", ".join(f"{var}_{k + 1}" for k in range(len(sessions)))
        return f"{lhs} = segment({', '.join(parts)})"

    def encode(self, session: int, step: int) -> str:
        a, names = self.args(session)
        self.calls.append(VisionCall("encode", step, names, [], ""))
        return f"encode({a})"

    def truth(self, roi: ROI, session: int = 0, stem: str | None = None) -> vl.Volume:
        acqs = self.case.sessions[session].acquisitions
        a = next(x for x in acqs if x.stem == stem) if stem else acqs[0]
        return self.case.truth(roi, session, a.volume)

    def acq(self, session: int, stem: str | None = None):
        acqs = self.case.sessions[session].acquisitions
        return next(x for x in acqs if x.stem == stem) if stem else acqs[0]

    def any_roi(self, session: int = 0, lesion_share: float = 0.5, need=None, both_share: float = 0.1,
                absent: bool = False) -> ROI:
        """A lesion with probability ``lesion_share``, else anatomy.

        With ``absent``, a lesion draw is an absent target with probability ABSENT_PROB, on
        lesion-free cases too (where the other lesion draws fall back to anatomy, as before).
        """
        if (self.case.sessions[session].lesions or absent) and self.rng.random() < lesion_share:
            if absent and self.rng.random() < ABSENT_PROB:
                try:
                    return self.absent_roi(session)
                except Skip:
                    pass
            if self.case.sessions[session].lesions:
                try:
                    return self.choose_lesion(session, need)[0]
                except Skip:
                    pass
        return self.choose_anatomy(session, both_share=both_share)

    def absent_meta(self) -> dict:
        """Draft meta describing the absent targets of this draft (empty when there are none)."""
        if not self.absent:
            return {}
        return {"absent": [dict(spec, phrase=phrase) for phrase, spec in self.absent.values()]}

    def img_word(self, stem: str) -> str:
        return self.pick(MODALITIES[stem][1])

    def dates(self) -> tuple[str, str]:
        return self.case.sessions[0].date, self.case.sessions[-1].date


def _q(v):
    return (float(v), v.unit)


def _need_sessions(b: Builder):
    if len(b.case.sessions) < 2:
        raise Skip("needs two sessions")


# ----------------------------------------------------------------------------- builders
def build_segmentation(b: Builder) -> Draft:
    roi = b.any_roi(absent=True)
    phrase, var = b.describe(roi)
    bare = phrase[4:] if phrase.startswith("the ") else phrase
    prompt = b.prompt("segmentation", {"roi": phrase, "roi_bare": bare})
    code = f"{b.segment(roi, var, [0], 0)}\nprint({var})\nreport(volumes={{{var!r}: {var}}})"
    truth = b.truth(roi)
    # an empty mask is reported with report()'s automatic "not found" answer (task_templates.api)
    answer = empty_mask_answer([var]) if roi.kind == "absent" else None
    return Draft(prompt, [code], b.calls, answer=answer, outputs={var: truth}, meta=b.absent_meta())


def build_volume(b: Builder) -> Draft:
    roi = b.any_roi(absent=True)
    phrase, var = b.describe(roi)
    prompt = b.prompt("volume", {"roi": phrase})
    s1 = f"{b.segment(roi, var, [0], 0)}\nvolume = vl.volume({var}, \"mL\")\nprint(volume)"
    s2 = "report(measurements={\"volume\": volume})"
    return Draft(prompt, [s1, s2], b.calls, measurements={"volume": _q(vl.volume(b.truth(roi), "mL"))},
                 meta=b.absent_meta())


def build_volume_change(b: Builder) -> Draft:
    _need_sessions(b)
    roi = b.any_roi(lesion_share=0.7)
    phrase, var = b.describe(roi)
    prompt = b.prompt("volume_change", {"roi": phrase})
    last = len(b.case.sessions) - 1
    d0, d1 = b.dates()
    s1 = (f"{b.segment(roi, var, [0, last], 0)}\n"
          f"before = vl.volume({var}_1, \"mL\")\nafter = vl.volume({var}_2, \"mL\")\nprint(before, after)")
    s2 = (f"change = vl.change(before, after, \"{d0}\", \"{d1}\")\nprint(change)\n"
          "report(measurements={\"volume change\": change[\"absolute\"], \"percent change\": change[\"percent\"], "
          "\"change per year\": change[\"per_year\"]})")
    v0 = vl.volume(b.truth(roi, 0), "mL")
    v1 = vl.volume(b.truth(roi, last), "mL")
    ch = vl.change(v0, v1, d0, d1)
    return Draft(prompt, [s1, s2], b.calls, measurements={
        "volume change": _q(ch["absolute"]), "percent change": _q(ch["percent"]),
        "change per year": _q(ch["per_year"])})


def build_volume_comparison(b: Builder) -> Draft:
    if b.rng.random() < 0.6:  # left vs right asymmetry
        roi = b.choose_anatomy(bilateral_only=True)
        left, right = ROI("anatomy", roi.key, "left"), ROI("anatomy", roi.key, "right")
        if not (b.case.present(left) and b.case.present(right)):
            raise Skip("one side missing")
        term = b.pick(ANATOMY[roi.key][1])
        pair = b.pick([f"the {term}", f"the left and right {term}", f"both {term}s" if not term.endswith("s") else f"both {term}"])
        prompt = b.prompt("volume_comparison", {"roi_pair": pair, "roi_bare": term})
        lv, rv = var_name(anatomy_canonical(roi.key, "left")), var_name(anatomy_canonical(roi.key, "right"))
        s1 = (f"{b.segment(left, lv, [0], 0)}\n{b.segment(right, rv, [0], 0)}\n"
              f"left = vl.volume({lv}, \"mL\")\nright = vl.volume({rv}, \"mL\")\nprint(left, right)")
        s2 = ("asymmetry = vl.asymmetry(left, right)\nprint(asymmetry)\n"
              "report(measurements={\"left volume\": left, \"right volume\": right, \"asymmetry index\": asymmetry})")
        L, R = vl.volume(b.truth(left), "mL"), vl.volume(b.truth(right), "mL")
        return Draft(prompt, [s1, s2], b.calls, measurements={
            "left volume": _q(L), "right volume": _q(R), "asymmetry index": _q(vl.asymmetry(L, R))},
            meta={"subtask": "asymmetry"})
    # ROI vs ROI
    r1 = b.any_roi(lesion_share=0.4)
    r2 = b.choose_anatomy()
    if r2 == r1:
        raise Skip("same ROI twice")
    p1, v1 = b.describe(r1)
    p2, v2 = b.describe(r2)
    if v1 == v2:
        v2 = v2 + "_2"
    prompt = b.prompt("volume_comparison_pair", {"roi": p1, "roi2": p2})
    s1 = (f"{b.segment(r1, v1, [0], 0)}\n{b.segment(r2, v2, [0], 0)}\n"
          f"first = vl.volume({v1}, \"mL\")\nsecond = vl.volume({v2}, \"mL\")\nprint(first, second)")
    s2 = ("difference = vl.Quantity(first - second, \"mL\")\nratio = vl.Quantity(first / second, \"1\")\n"
          "print(difference, ratio)\n"
          "report(measurements={\"volume difference\": difference, \"volume ratio\": ratio})")
    A, B = float(vl.volume(b.truth(r1), "mL")), float(vl.volume(b.truth(r2), "mL"))
    return Draft(prompt, [s1, s2], b.calls, measurements={"volume difference": (A - B, "mL"),
                                                        "volume ratio": (A / B, "1")}, meta={"subtask": "pair"})


def build_relative_volume(b: Builder) -> Draft:
    metas = b.lesions(0, lambda m: bool(m.get("components")))
    if metas and b.rng.random() < 0.6:  # component share of a lesion
        m = metas[int(b.rng.integers(len(metas)))]
        comps = [c for c in m["components"] if c in COMPONENT_TERMS]
        comp = comps[int(b.rng.integers(len(comps)))] if comps else None
        whole = ROI("lesion", str(m["id"]))
        part = ROI("component", str(m["id"]), component=comp)
        if comp is None or not b.case.present(part):
            raise Skip("component absent on this grid")
        pw, vw = b.describe(whole)
        part_phrase = "the " + b.pick(COMPONENT_TERMS[comp])
        vp = f"{comp}_component"
        prompt = b.prompt("relative_volume", {"roi": pw, "part": part_phrase, "part_short": comp})
        s1 = (f"{b.segment(whole, vw, [0], 0)}\n{b.segment(part, vp, [0], 0)}\n"
              f"whole = vl.volume({vw}, \"mL\")\npart = vl.volume({vp}.masked({vw}), \"mL\")\nprint(whole, part)")
        tw, tp = b.truth(whole), b.truth(part)
        expected = 100 * float(vl.volume(tp.masked(tw), "mL")) / float(vl.volume(tw, "mL"))
    else:  # lesion burden within a structure
        roi_l, m = b.choose_lesion()
        struct = ROI("anatomy", "Cerebral-White-Matter", m.get("hemisphere")) \
            if m.get("hemisphere") in ("left", "right") else ROI("anatomy", "Brain")
        if not b.case.present(struct):
            raise Skip("structure absent")
        pl, vp = b.describe(roi_l)
        pw, vw = b.describe(struct)
        prompt = b.prompt("relative_volume", {"roi": pw, "part": pl, "part_short": "lesion"})
        s1 = (f"{b.segment(struct, vw, [0], 0)}\n{b.segment(roi_l, vp, [0], 0)}\n"
              f"whole = vl.volume({vw}, \"mL\")\npart = vl.volume({vp}.masked({vw}), \"mL\")\nprint(whole, part)")
        tw, tp = b.truth(struct), b.truth(roi_l)
        expected = 100 * float(vl.volume(tp.masked(tw), "mL")) / float(vl.volume(tw, "mL"))
    s2 = "percent = vl.Quantity(100 * part / whole, \"%\")\nprint(percent)\nreport(measurements={\"percent\": percent})"
    return Draft(prompt, [s1, s2], b.calls, measurements={"percent": (expected, "%")})


def build_extent(b: Builder) -> Draft:
    roi = b.any_roi()
    phrase, var = b.describe(roi)
    if b.rng.random() < 0.7:
        ax = ["lr", "ap", "si"][int(b.rng.integers(3))]
        words, adj = AXES[ax]
        prompt = b.prompt("extent", {"roi": phrase, "axis": b.pick(words), "axis_adj": adj})
        s1 = f"{b.segment(roi, var, [0], 0)}\nextent = vl.extent({var}, \"{ax}\")\nprint(extent)"
        s2 = f"report(measurements={{\"extent {ax}\": extent}})"
        return Draft(prompt, [s1, s2], b.calls, measurements={f"extent {ax}": _q(vl.extent(b.truth(roi), ax))},
                     meta={"axis": ax})
    prompt = b.prompt("extent_box", {"roi": phrase})
    s1 = f"{b.segment(roi, var, [0], 0)}\nextent = vl.extent({var})\nprint(extent)"
    s2 = "report(measurements={\"extent\": extent})"
    e = vl.extent(b.truth(roi))
    return Draft(prompt, [s1, s2], b.calls, measurements={"extent": ({k: float(v) for k, v in e.items()}, "mm")},
                 meta={"axis": "box"})


def build_extent_change(b: Builder) -> Draft:
    _need_sessions(b)
    roi = b.any_roi(lesion_share=0.7)
    phrase, var = b.describe(roi)
    ax = ["lr", "ap", "si"][int(b.rng.integers(3))]
    words, _ = AXES[ax]
    prompt = b.prompt("extent_change", {"roi": phrase, "axis": b.pick(words), "axis_verb": b.pick(AXIS_VERBS[ax])})
    last = len(b.case.sessions) - 1
    s1 = (f"{b.segment(roi, var, [0, last], 0)}\nbefore = vl.extent({var}_1, \"{ax}\")\n"
          f"after = vl.extent({var}_2, \"{ax}\")\nprint(before, after)")
    s2 = ("change = vl.change(before, after)\nprint(change)\n"
          "report(measurements={\"extent change\": change[\"absolute\"], \"percent change\": change[\"percent\"]})")
    ch = vl.change(vl.extent(b.truth(roi, 0), ax), vl.extent(b.truth(roi, last), ax))
    return Draft(prompt, [s1, s2], b.calls, measurements={"extent change": _q(ch["absolute"]),
                                                        "percent change": _q(ch["percent"])}, meta={"axis": ax})


def build_center_of_mass(b: Builder) -> Draft:
    roi = b.any_roi()
    phrase, var = b.describe(roi)
    prompt = b.prompt("center_of_mass", {"roi": phrase})
    s1 = f"{b.segment(roi, var, [0], 0)}\ncenter = vl.center_of_mass({var})\nprint(center)"
    s2 = "report(measurements={\"center of mass\": center})"
    c = vl.center_of_mass(b.truth(roi))
    return Draft(prompt, [s1, s2], b.calls, measurements={"center of mass": ([float(x) for x in c], "mm")})


def _unit(stem: str) -> str:
    return "HU" if stem == "ct" else "a.u."


def build_intensity(b: Builder) -> Draft:
    roi = b.any_roi()
    phrase, var = b.describe(roi)
    stem = b.rng.choice(b.case.stems(0))
    a = b.acq(0, stem)
    mr_ok = [i for i, t in enumerate(T["intensity"]) if "density" not in t and "attenuation" not in t]
    prompt = b.prompt("intensity", {"roi": phrase, "img": b.img_word(stem)},
                      subset=None if stem == "ct" else mr_ok)
    s1 = (f"{b.segment(roi, var, [0], 0)}\nstats = vl.intensity_stats({a.name}, {var}, unit=\"{_unit(stem)}\")\n"
          "print(stats[\"mean\"], stats[\"std\"])")
    s2 = "report(measurements={\"mean intensity\": stats[\"mean\"]})"
    exp = vl.intensity_stats(a.volume, b.truth(roi), unit=_unit(stem))["mean"]
    return Draft(prompt, [s1, s2], b.calls, measurements={"mean intensity": _q(exp)}, meta={"image": stem})


def build_intensity_comparison(b: Builder) -> Draft:
    r1 = b.any_roi(lesion_share=0.7)
    r2 = b.choose_anatomy()
    if r1 == r2:
        raise Skip("same ROI")
    p1, v1 = b.describe(r1)
    p2, v2 = b.describe(r2)
    if v1 == v2:
        v2 += "_2"
    stem = b.rng.choice(b.case.stems(0))
    a = b.acq(0, stem)
    prompt = b.prompt("intensity_comparison", {"roi": p1, "roi2": p2, "img": b.img_word(stem)})
    s1 = f"{b.segment(r1, v1, [0], 0)}\n{b.segment(r2, v2, [0], 0)}\n" \
         f"relative = vl.relative_intensity({a.name}, {v1}, {v2}, unit=\"{_unit(stem)}\")\n" \
         "print(relative[\"roi_mean\"], relative[\"reference_mean\"])"
    s2 = ("print(relative[\"ratio\"], relative[\"difference\"])\n"
          "report(measurements={\"intensity ratio\": relative[\"ratio\"], \"intensity difference\": relative[\"difference\"]})")
    rel = vl.relative_intensity(a.volume, b.truth(r1), b.truth(r2), unit=_unit(stem))
    return Draft(prompt, [s1, s2], b.calls, measurements={"intensity ratio": _q(rel["ratio"]),
                                                        "intensity difference": _q(rel["difference"])},
                 meta={"image": stem})


def build_intensity_change(b: Builder) -> Draft:
    _need_sessions(b)
    last = len(b.case.sessions) - 1
    common = [s for s in b.case.stems(0) if s in b.case.stems(last)]
    if not common:
        raise Skip("no contrast in both sessions")
    stem = common[int(b.rng.integers(len(common)))]
    roi = b.any_roi(lesion_share=0.7)
    phrase, var = b.describe(roi)
    a0, a1 = b.acq(0, stem), b.acq(last, stem)
    prompt = b.prompt("intensity_change", {"roi": phrase, "img": b.img_word(stem)})
    u = _unit(stem)
    s1 = (f"{b.segment(roi, var, [0, last], 0)}\n"
          f"before = vl.mean_intensity({a0.name}, {var}_1, unit=\"{u}\")\n"
          f"after = vl.mean_intensity({a1.name}, {var}_2, unit=\"{u}\")\nprint(before, after)")
    s2 = ("change = vl.change(before, after)\nprint(change)\n"
          "report(measurements={\"intensity change\": change[\"absolute\"], \"percent change\": change[\"percent\"]})")
    t0 = b.case.truth(roi, 0, b.acq(0).volume)
    t1 = b.case.truth(roi, last, b.acq(last).volume)
    ch = vl.change(vl.mean_intensity(a0.volume, t0, u), vl.mean_intensity(a1.volume, t1, u))
    return Draft(prompt, [s1, s2], b.calls, measurements={"intensity change": _q(ch["absolute"]),
                                                        "percent change": _q(ch["percent"])}, meta={"image": stem})


def build_location(b: Builder) -> Draft:
    roi, m = b.choose_lesion(absent=True)
    phrase, _ = b.describe(roi)
    if m is None:  # absent target: the same program, answered "not found"
        sub = "territory" if b.rng.random() < ABSENT_TERRITORY_SHARE else "location"
        prompt = b.prompt(sub, {"roi": phrase})
        answer = NOT_FOUND_ANSWER
        s1 = b.encode(0, 0)
        s2 = f"report(answer={answer!r})"
        return Draft(prompt, [s1, s2], b.calls, answer=answer, meta={"subtask": sub, **b.absent_meta()})
    if m.get("territory") and b.rng.random() < 0.3:
        prompt = b.prompt("territory", {"roi": phrase})
        answer = territory_answer(m)
        sub = "territory"
    else:
        prompt = b.prompt("location", {"roi": phrase})
        answer = location_answer(m)
        sub = "location"
    s1 = b.encode(0, 0)
    s2 = f"report(answer={answer!r})"
    return Draft(prompt, [s1, s2], b.calls, answer=answer, meta={"subtask": sub})


def _yes_no(flag: bool, yes: str, no: str) -> str:
    return yes if flag else no


ENH_YES, ENH_NO = "yes, it enhances after contrast", "no, it does not enhance after contrast"
RES_YES, RES_NO = "yes, it restricts diffusion", "no, it does not restrict diffusion"
#: enhancement: post/pre ratio of (lesion / surroundings) above this
ENHANCEMENT_RATIO = 1.15


def build_enhancement(b: Builder) -> Draft:
    if not {"t1", "t1c"} <= set(b.case.stems(0)):
        raise Skip("needs T1 and post-contrast T1")
    roi, m = b.choose_lesion()
    phrase, var = b.describe(roi)
    prompt = b.prompt("enhancement", {"roi": phrase})
    t1, t1c = b.acq(0, "t1").name, b.acq(0, "t1c").name
    s1 = (f"{b.segment(roi, var, [0], 0)}\nring = vl.surrounding({var}, 3.0)\n"
          f"pre = vl.relative_intensity({t1}, {var}, ring)[\"ratio\"]\n"
          f"post = vl.relative_intensity({t1c}, {var}, ring)[\"ratio\"]\nprint(pre, post)")
    s2 = (f"enhances = post > {ENHANCEMENT_RATIO} * pre\n"
          f"report(answer={ENH_YES!r} if enhances else {ENH_NO!r}, "
          "measurements={\"post/pre contrast ratio\": vl.Quantity(post / pre, \"1\")})")
    t = b.truth(roi)
    ring = vl.surrounding(t, 3.0)
    pre = float(vl.relative_intensity(b.acq(0, "t1").volume, t, ring)["ratio"])
    post = float(vl.relative_intensity(b.acq(0, "t1c").volume, t, ring)["ratio"])
    flag = post > ENHANCEMENT_RATIO * pre
    return Draft(prompt, [s1, s2], b.calls, answer=_yes_no(flag, ENH_YES, ENH_NO),
                 measurements={"post/pre contrast ratio": (post / pre, "1")},
                 meta={"metadata_agrees": bool(flag) == bool(m.get("enhancement"))})


def build_restriction(b: Builder) -> Draft:
    if not {"dwi", "adc"} <= set(b.case.stems(0)):
        raise Skip("needs DWI and ADC")
    roi, m = b.choose_lesion()
    phrase, var = b.describe(roi)
    prompt = b.prompt("restriction", {"roi": phrase})
    dwi, adc = b.acq(0, "dwi").name, b.acq(0, "adc").name
    s1 = (f"{b.segment(roi, var, [0], 0)}\n"
          f"dwi_signal = vl.signal_class({dwi}, {var})\nadc_signal = vl.signal_class({adc}, {var})\n"
          "print(dwi_signal, adc_signal)")
    s2 = (f"restricts = dwi_signal == \"hyperintense\" and adc_signal == \"hypointense\"\n"
          f"report(answer={RES_YES!r} if restricts else {RES_NO!r})")
    t = b.truth(roi)
    d = vl.signal_class(b.acq(0, "dwi").volume, t)
    a = vl.signal_class(b.acq(0, "adc").volume, t)
    flag = d == "hyperintense" and a == "hypointense"
    return Draft(prompt, [s1, s2], b.calls, answer=_yes_no(flag, RES_YES, RES_NO),
                 meta={"metadata_agrees": flag == bool(m.get("restriction"))})


_SYNTH_KEY = {"t1": "t1w", "t2": "t2w"}
_SHORT = {"hyperintense": "hyper", "hypointense": "hypo", "isointense": "iso"}


def build_signal(b: Builder) -> Draft:
    roi, m = b.choose_lesion()
    phrase, var = b.describe(roi)
    prompt = b.prompt("signal", {"roi": phrase})
    acqs = b.case.sessions[0].acquisitions
    lines = [b.segment(roi, var, [0], 0)]
    for a in acqs:
        lines.append(f"{a.name}_signal = vl.signal_class({a.name}, {var})")
    lines.append("print(" + ", ".join(f"{a.name}_signal" for a in acqs) + ")")
    parts = " + \", \" + ".join(f"{a.name}_signal + \" on {a.modality}\"" for a in acqs)
    s2 = f"report(answer={parts})"
    t = b.truth(roi)
    answer = ", ".join(f"{vl.signal_class(a.volume, t)} on {a.modality}" for a in acqs)
    agree = all(m.get("signal", {}).get(_SYNTH_KEY.get(a.stem, a.stem)) in (None, _SHORT[vl.signal_class(a.volume, t)])
                for a in acqs if a.stem != "ct")
    return Draft(prompt, ["\n".join(lines), s2], b.calls, answer=answer, meta={"metadata_agrees": agree})


def build_cropping(b: Builder) -> Draft:
    roi = b.any_roi()
    phrase, var = b.describe(roi)
    stem = b.rng.choice(b.case.stems(0))
    a = b.acq(0, stem)
    margin = int(b.rng.choice([0, 2, 5, 10, 15, 20]))
    prompt = b.prompt("cropping", {"roi": phrase, "img": f"the {b.img_word(stem)}", "margin": str(margin),
                                   "margin_word": b.pick(["margin", "of margin", "padding"])})
    if "{margin}" not in T["cropping"][b.last_template]:
        margin = 0
    s1 = f"{b.segment(roi, var, [0], 0)}\ncropped = {a.name}.crop({var}, margin={margin})\nprint(cropped)"
    s2 = "report(volumes={\"cropped\": cropped})"
    return Draft(prompt, [s1, s2], b.calls, outputs={"cropped": a.volume.crop(b.truth(roi), margin=margin)},
                 meta={"image": stem, "margin_mm": margin})


def build_tissue_removal(b: Builder) -> Draft:
    roi = b.any_roi(absent=True)
    phrase, var = b.describe(roi)
    stem = b.rng.choice(b.case.stems(0))
    a = b.acq(0, stem)
    prompt = b.prompt("tissue_removal", {"roi": phrase, "img": f"the {b.img_word(stem)}"})
    keep = b.last_template in KEEP_TEMPLATES
    op = f"{a.name}.masked({var})" if keep else f"{a.name}.masked({var}, invert=True)"
    s1 = f"{b.segment(roi, var, [0], 0)}\nresult = {op}\nprint(result)"
    s2 = "report(volumes={\"result\": result})"
    t = b.truth(roi)
    out = a.volume.masked(t) if keep else a.volume.masked(t, invert=True)
    return Draft(prompt, [s1, s2], b.calls, outputs={"result": out},
                 meta={"image": stem, "keep": keep, **b.absent_meta()})


BUILDERS: dict[str, Callable[[Builder], Draft]] = {
    "segmentation": build_segmentation, "volume": build_volume, "volume_change": build_volume_change,
    "volume_comparison": build_volume_comparison, "relative_volume": build_relative_volume,
    "extent": build_extent, "extent_change": build_extent_change, "center_of_mass": build_center_of_mass,
    "intensity": build_intensity, "intensity_comparison": build_intensity_comparison,
    "intensity_change": build_intensity_change, "location": build_location, "enhancement": build_enhancement,
    "restriction": build_restriction, "signal": build_signal, "cropping": build_cropping,
    "tissue_removal": build_tissue_removal,
}
assert list(BUILDERS) == CATEGORIES
