"""The fixed rules of the synthetic world: attribute vocabularies and how each attribute shows
up in pixels and in sound.

Every attribute is carried by every modality on its own, so a model can only align a picture
with a sound through what both *mean*:

| attribute | image                          | audio                                   | text            |
|-----------|--------------------------------|-----------------------------------------|-----------------|
| shape     | outline drawn                  | timbre (waveform)                       | noun            |
| colour    | fill colour (palette below)    | pitch: fundamental frequency            | adjective       |
| size      | radius                         | loudness: RMS level in dB               | adjective       |
| position  | horizontal third of the frame  | onset time: left early, right late      | phrase          |

The numbers below are written into `world.json` so a dataset documents itself. Change any of
them and bump `SYNTH_VERSION`: cached worlds generated under the old rules are then rebuilt.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

# Bump whenever rendering, sampling or text generation changes the bytes written for a seed.
SYNTH_VERSION = 7  # 5: scenes told in words, show turns described, two memory dialogues per scene;
# 7: "is there …?" outside the held-out split never names a held-out pair (6: the `turn-first` branch's)

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
# Rainbow order, so that pitch rises with the colour's index (red = lowest, as in light).
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SIZES = ("small", "large")
# Left to right; scene labels list objects in this order.
POSITIONS = ("left", "centre", "right")

ATTRIBUTES: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
)

# ---------------------------------------------------------------- image rules
# Saturated, well-separated hues; the background is a low-saturation grey so any of them stands out.
PALETTE_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 215, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "purple": (145, 55, 200),
}
# Circumscribed radius of an object, as a fraction of the image width.
RADIUS_FRACTION = {"small": 0.095, "large": 0.145}
# Horizontal centre of each position slot, as a fraction of the width (the thirds of the frame).
X_FRACTION = {"left": 1 / 6, "centre": 1 / 2, "right": 5 / 6}
X_JITTER_FRACTION = 0.015  # two large objects in adjacent slots never touch: 2 * 0.145 < 1/3 - 2 * 0.015
Y_JITTER_FRACTION = 0.12
MAX_ROTATION_DEG = 15.0  # a square turned 45 degrees would be a diamond: stay far from that
COLOUR_JITTER = 12  # per channel, uniform +-
BACKGROUND_GREY = (40, 215)  # uniform range of the background level
BACKGROUND_TINT = 12  # per channel, uniform +-
PIXEL_NOISE_STD = (3.0, 9.0)  # uniform range of the Gaussian pixel noise std
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges

# ---------------------------------------------------------------- audio rules
# Fundamentals a perfect fourth (5 semitones) apart from A3: no fundamental is a low harmonic
# of another, and the nearest two are 73 Hz apart, far beyond any jitter or vibrato.
PITCH_SEMITONES = {colour: 5 * i for i, colour in enumerate(COLOURS)}
PITCH_HZ = {colour: round(220.0 * 2 ** (st / 12), 2) for colour, st in PITCH_SEMITONES.items()}
PITCH_JITTER_CENTS = 10.0
# Timbre per shape; every waveform keeps its fundamental as the strongest partial.
TIMBRE = {
    "circle": "sine",  # one partial: pure and round
    "square": "square",  # odd harmonics at 1/n: hollow
    "triangle": "sawtooth",  # every harmonic at 1/n: bright and sharp-toothed
    "star": "fm_bell",  # inharmonic partials at f, 2.5f, 4.5f...: sparkling bell
    "cross": "pulse_train",  # narrow pulses, flat strong harmonics 1-5: buzzy
    "diamond": "vibrato",  # soft triangle wave whose pitch wobbles +-1 semitone at 7 Hz
}
TIMBRE_DESCRIPTION = {
    "sine": "a pure sine tone",
    "square": "a hollow square-wave tone",
    "sawtooth": "a bright sawtooth tone",
    "fm_bell": "a metallic FM bell",
    "pulse_train": "a buzzy pulse train",
    "vibrato": "a soft, wobbling vibrato tone",
}
# Level of an event's RMS relative to REFERENCE_RMS: 12 dB apart, far beyond the jitter.
GAIN_DB = {"small": -12.0, "large": 0.0}
GAIN_JITTER_DB = 1.0
REFERENCE_RMS = 0.15  # the peakiest waveform (pulse train, crest ~3.6) then peaks near 0.6: no clipping
# Onset of each position's event; events last EVENT_S, so consecutive slots never overlap.
ONSET_S = {"left": 0.10, "centre": 0.50, "right": 0.90}
ONSET_JITTER_S = 0.03
EVENT_S = 0.30
ATTACK_S = 0.015
RELEASE_S = 0.05
DURATION_S = (1.3, 1.7)  # uniform range of a clip's length; the right slot ends by 1.23 s
NOISE_RMS = (0.0015, 0.004)  # white background noise: >= 18 dB below the quietest event (0.15·10^(-13/20) over 0.004: 18.5 dB)
FM_RATIO, FM_INDEX = 3.5, 1.0
PULSE_DUTY = 0.15
VIBRATO_HZ, VIBRATO_SEMITONES = 7.0, 1.0

# ---------------------------------------------------------------- scene sampling
MAX_OBJECTS = 2
P_SINGLE = 0.5  # half the scenes hold one object: keeps the world learnable


def rules_json() -> dict[str, Any]:
    """All the rules above as plain JSON, for `world.json` and for `describe_scene`."""
    return {
        "version": SYNTH_VERSION,
        "image": {
            "palette_rgb": {k: list(v) for k, v in PALETTE_RGB.items()},
            "radius_fraction_of_width": RADIUS_FRACTION,
            "x_centre_fraction_of_width": X_FRACTION,
            "x_jitter_fraction": X_JITTER_FRACTION,
            "y_jitter_fraction": Y_JITTER_FRACTION,
            "max_rotation_deg": MAX_ROTATION_DEG,
            "colour_jitter": COLOUR_JITTER,
            "background_grey": list(BACKGROUND_GREY),
            "background_tint": BACKGROUND_TINT,
            "pixel_noise_std": list(PIXEL_NOISE_STD),
        },
        "audio": {
            "pitch_hz": PITCH_HZ,
            "pitch_jitter_cents": PITCH_JITTER_CENTS,
            "timbre": TIMBRE,
            "gain_db": GAIN_DB,
            "gain_jitter_db": GAIN_JITTER_DB,
            "reference_rms": REFERENCE_RMS,
            "onset_s": ONSET_S,
            "onset_jitter_s": ONSET_JITTER_S,
            "event_s": EVENT_S,
            "attack_s": ATTACK_S,
            "release_s": RELEASE_S,
            "duration_s": list(DURATION_S),
            "noise_rms": list(NOISE_RMS),
            "fm": {"ratio": FM_RATIO, "index": FM_INDEX},
            "pulse_duty": PULSE_DUTY,
            "vibrato": {"rate_hz": VIBRATO_HZ, "depth_semitones": VIBRATO_SEMITONES},
        },
        "scenes": {"max_objects": MAX_OBJECTS, "p_single": P_SINGLE},
    }
