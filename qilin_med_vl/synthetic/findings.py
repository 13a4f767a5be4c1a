# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Clinical side of the synthetic benchmark: which findings a patient has, how they change, and the Chinese text.

Labels (balanced by `dataset.py`):
- single-image diseases `DISEASES`: normal, flake (骨质破坏, the small-lesion class), fracture, osteophyte
  (骨质增生硬化), narrowing (关节间隙变窄), postop (术后改变);
- comparative changes `CHANGES`: improved (好转), worsened (加重), unchanged (无明显变化), postop (术后改变), each
  applied to one of `COMPARATIVE_KINDS`.

Locations are a side (右侧 = leg 0 = image left, radiological orientation; 左侧 = leg 1) and a segment (股骨下段 =
femur, 胫骨上段 = tibia); joint-space narrowing is located at 膝关节内侧间隙 instead of a segment.

Text: questions vary (five templates per task); answers use two or three fixed frames around one canonical phrase
per finding, so a small model can learn them and BLEU has a stable target.
"""

from dataclasses import replace

import numpy as np

from .render import Anatomy, Finding

__all__ = [
    "CHANGES",
    "CHANGE_NAMES",
    "COMPARATIVE_KINDS",
    "DISEASES",
    "DISEASE_NAMES",
    "QUESTION_TEMPLATES",
    "TASKS",
    "FlakeSizes",
    "apply_change",
    "comparative_answer",
    "description_answer",
    "disease_answer",
    "disease_of",
    "location_answer",
    "location_text",
    "question",
    "sample_finding",
]

TASKS = ("description", "disease", "location", "comparative")
DISEASES = ("normal", "flake", "fracture", "osteophyte", "narrowing", "postop")
DISEASE_NAMES = {
    "normal": "未见明显异常",
    "flake": "骨质破坏",
    "fracture": "骨折",
    "osteophyte": "骨质增生硬化",
    "narrowing": "关节间隙变窄",
    "postop": "术后改变",
}
# Disease label of each drawn finding kind.
_KIND_TO_DISEASE = {
    "flake": "flake",
    "fracture": "fracture",
    "osteophyte": "osteophyte",
    "narrowing": "narrowing",
    "implant": "postop",
}
CHANGES = ("improved", "worsened", "unchanged", "postop")
CHANGE_NAMES = {"improved": "好转", "worsened": "加重", "unchanged": "无明显变化", "postop": "术后改变"}
COMPARATIVE_KINDS = ("flake", "fracture", "osteophyte", "narrowing")

SIDE_WORDS = ("右侧", "左侧")  # leg 0 is the patient's right knee (image left)
KNEE_WORDS = ("右膝", "左膝")
SEGMENT_WORDS = {"femur": "股骨下段", "tibia": "胫骨上段"}

QUESTION_TEMPLATES = {
    "description": (
        "请描述这张X光片的影像表现。",
        "这张膝关节X光片显示了什么？",
        "请根据图像写出影像学所见。",
        "请分析这张图像并给出描述。",
        "图中可见哪些影像学表现？",
    ),
    "disease": (
        "此图是否有异常？如有，是什么病变？",
        "这张X光片提示什么疾病？",
        "根据图像，患者可能的诊断是什么？",
        "请判断图中的病变类型。",
        "该影像考虑什么诊断？",
    ),
    "location": (
        "病变位于哪个部位？",
        "请指出图中异常的位置。",
        "图中的病灶在哪里？",
        "异常出现在哪一侧、哪个骨段？",
        "请定位图中的病变。",
    ),
    "comparative": (
        "第一张和第二张分别是患者治疗前后的膝关节X光片，请对比两张图片。",
        "这两张图片分别是患者第一次检查和复查时的X光片，请对比分析。",
        "请比较患者两次检查的X光片，病变有何变化？",
        "第一张为治疗前，第二张为治疗后，请描述两次检查的变化。",
        "对比两张膝关节X光片，判断病情的变化。",
    ),
}

_DESCRIPTION_FRAMES = ("{findings}{negatives}", "影像所见：{findings}{negatives}")
_NORMAL_DESCRIPTION = "双膝关节诸骨骨质完整，骨小梁清晰，关节间隙未见变窄，未见明显异常。"
_DISEASE_FRAMES = ("考虑{name}。", "影像提示{name}。", "诊断：{name}。")
_NORMAL_DISEASE = ("未见明显异常。", "双膝关节未见明显异常。", "诊断：未见明显异常。")
_LOCATION_FRAMES = ("病变位于{location}。", "异常位于{location}。", "{location}。")
_NORMAL_LOCATION = ("未见明确病变，无需定位。", "双膝关节未见明确病灶。")
_COMPARATIVE_FRAMES = (
    "第一张显示{before}。第二张相比第一张，{change}，{conclusion}。",
    "第一张可见{before}。与第一张相比，第二张{change}，{conclusion}。",
)
_CHANGE_PHRASES = {
    "flake": {"improved": "低密度影范围缩小、密度增高", "worsened": "低密度影范围增大、密度减低"},
    "fracture": {"improved": "骨折线模糊，较前愈合", "worsened": "骨折线增宽"},
    "osteophyte": {"improved": "骨质增生、硬化程度减弱", "worsened": "骨质增生、硬化程度加重"},
    "narrowing": {"improved": "关节间隙较前增宽", "worsened": "关节间隙进一步变窄"},
}
_CONCLUSIONS = {
    "improved": "提示病变较前好转",
    "worsened": "提示病变较前加重",
    "unchanged": "提示病变无明显变化",
    "postop": "表明{knee}关节术后改变",
}


class FlakeSizes:
    """Flake diameters in reference pixels (of a 1024 image): small ones vanish at 336 px, large ones do not."""

    def __init__(self, small=(6.0, 12.0), large=(16.0, 32.0), large_fraction=0.25):
        self.small, self.large, self.large_fraction = tuple(small), tuple(large), float(large_fraction)

    def sample(self, rng: np.random.Generator) -> float:
        low, high = self.large if rng.uniform() < self.large_fraction else self.small
        return float(rng.uniform(low, high))


def disease_of(finding: Finding) -> str:
    return _KIND_TO_DISEASE[finding.kind]


def sample_finding(
    rng: np.random.Generator, disease: str, leg: int, bone: str, flake_sizes: FlakeSizes, comparative: bool = False
) -> Finding:
    """
    One finding of `disease` (not "normal") on `leg` / `bone`; `comparative=True` picks sizes that leave room to
    get better and worse (a moderate joint-space narrowing rather than a near-closed one).
    """
    seed = int(rng.integers(2**31))
    if disease == "flake":
        return Finding(
            "flake",
            leg,
            bone,
            depth=rng.uniform(40, 110),
            across=rng.uniform(-0.5, 0.5),
            size=flake_sizes.sample(rng),
            strength=rng.uniform(0.7, 0.85),
            seed=seed,
        )
    if disease == "fracture":
        return Finding(
            "fracture",
            leg,
            bone,
            depth=rng.uniform(45, 120),
            size=rng.uniform(2.0, 3.0),
            strength=rng.uniform(0.6, 0.8),
            angle=rng.uniform(-0.35, 0.35),
            seed=seed,
        )
    if disease == "osteophyte":
        return Finding("osteophyte", leg, bone, size=rng.uniform(14, 26), strength=rng.uniform(0.3, 0.5), seed=seed)
    if disease == "narrowing":
        remaining = rng.uniform(7, 10) if comparative else rng.uniform(3, 7)
        return Finding("narrowing", leg, "tibia", size=remaining, seed=seed)
    if disease == "postop":
        return Finding("implant", leg, bone, depth=rng.uniform(15, 30), size=rng.uniform(150, 230), seed=seed)
    raise ValueError(f"No finding to sample for disease {disease!r}; expected one of {DISEASES[1:]}")


def apply_change(rng: np.random.Generator, anatomy: Anatomy, before: Finding, change: str) -> list[Finding]:
    """The findings of the follow-up image: `before` improved, worsened, unchanged, or improved under an implant."""
    if change == "unchanged":
        return [before]
    if change in ("improved", "postop"):
        if before.kind == "narrowing":
            healthy = anatomy.joint_gap_medial
            after = replace(before, size=min(healthy, before.size + rng.uniform(6, 10)))
        else:
            after = replace(before, size=before.size * rng.uniform(0.5, 0.7), strength=before.strength * 0.55)
        if change == "improved":
            return [after]
        implant = sample_finding(rng, "postop", before.leg, before.bone, FlakeSizes())
        return [after, implant]
    if change == "worsened":
        if before.kind == "narrowing":
            return [replace(before, size=before.size * rng.uniform(0.25, 0.4))]
        if before.kind == "flake":
            return [
                replace(before, size=before.size * rng.uniform(1.5, 2.0), strength=min(0.95, before.strength * 1.15))
            ]
        if before.kind == "fracture":
            return [
                replace(before, size=before.size * rng.uniform(1.7, 2.2), strength=min(0.95, before.strength * 1.2))
            ]
        return [replace(before, size=before.size * rng.uniform(1.4, 1.7), strength=before.strength * 1.5)]
    raise ValueError(f"Unknown change {change!r}; expected one of {CHANGES}")


# --- text -------------------------------------------------------------------------------------------------------


def location_text(finding: Finding) -> str:
    """ "右侧股骨下段", "左侧胫骨上段", or for narrowing "右侧膝关节内侧间隙"."""
    side = SIDE_WORDS[finding.leg]
    if finding.kind == "narrowing":
        return f"{side}膝关节内侧间隙"
    return f"{side}{SEGMENT_WORDS[finding.bone]}"


def _finding_sentence(finding: Finding) -> str:
    location = location_text(finding)
    if finding.kind == "flake":
        return f"{location}可见片状低密度影"
    if finding.kind == "fracture":
        return f"{location}可见线状透亮影，骨皮质不连续"
    if finding.kind == "osteophyte":
        eminence = "，髁间隆起变尖" if finding.bone == "tibia" else ""
        return f"{location}骨质边缘增生、硬化{eminence}"
    if finding.kind == "narrowing":
        return f"{SIDE_WORDS[finding.leg]}膝关节内侧间隙变窄"
    return f"{location}可见金属内固定影，呈术后改变"


def _finding_noun(finding: Finding) -> str:
    location = location_text(finding)
    return {
        "flake": f"{location}片状低密度影",
        "fracture": f"{location}骨折线",
        "osteophyte": f"{location}骨质边缘增生、硬化",
        "narrowing": f"{location}变窄",
    }[finding.kind]


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def description_answer(rng: np.random.Generator, findings: list[Finding]) -> str:
    if not findings:
        return _NORMAL_DESCRIPTION
    sentences = "".join(_finding_sentence(f) + "。" for f in findings)
    negatives = "" if any(f.kind == "narrowing" for f in findings) else "关节间隙未见变窄。"
    negatives += "余骨质未见明显异常。"
    return _pick(rng, _DESCRIPTION_FRAMES).format(findings=sentences, negatives=negatives)


def disease_answer(rng: np.random.Generator, findings: list[Finding]) -> str:
    if not findings:
        return _pick(rng, _NORMAL_DISEASE)
    names = "、".join(dict.fromkeys(DISEASE_NAMES[disease_of(f)] for f in findings))
    return _pick(rng, _DISEASE_FRAMES).format(name=names)


def location_answer(rng: np.random.Generator, findings: list[Finding]) -> str:
    if not findings:
        return _pick(rng, _NORMAL_LOCATION)
    return _pick(rng, _LOCATION_FRAMES).format(location="、".join(dict.fromkeys(location_text(f) for f in findings)))


def comparative_answer(rng: np.random.Generator, before: Finding, change: str) -> str:
    noun = _finding_noun(before)
    if change == "unchanged":
        change_text = f"{noun}未见明显变化"
    elif change == "postop":
        change_text = f"可见金属内固定影，{_CHANGE_PHRASES[before.kind]['improved']}"
    else:
        change_text = _CHANGE_PHRASES[before.kind][change]
    conclusion = _CONCLUSIONS[change].format(knee=KNEE_WORDS[before.leg])
    return _pick(rng, _COMPARATIVE_FRAMES).format(before=noun, change=change_text, conclusion=conclusion)


def question(rng: np.random.Generator, task: str) -> str:
    return _pick(rng, QUESTION_TEMPLATES[task])
