"""Out-of-distribution warning: how well the score separates the test split from inputs the
demo model never saw, and how often it warns on the test split.

One run with the shipped demo bundle's model: statistics fitted (``training.ood``) on phantom
renders of demo training seeds (1000-1053, every third), the threshold chosen on renders of
seeds 3000+ (never trained on: the role of the validation split), then scored:

- in distribution: the test split, seeds 2000+ (never trained on), each seed's COVID,
  normal and pneumonia study, its lung-bearing slices as the node selects them;
- out of source: non-chest CT (the phantoms' own slices above and below the lungs, and
  synthetic head-like slices: skull, brain, air), photographs (scikit-image's bundled
  samples, grey-scaled), and noise / blank images.

Printed: AUROC of the slice score (test slices vs each out-of-source set), the share of each
set above the threshold, and the false-alarm rate on the test split (slices, and studies as
the node flags them: median slice score, the intensity histogram and header checks).
A model trained on other (real) data, fed the phantoms, is not measured: no such model here.

Run: ``.venv/bin/python -m bench.ood [--train-seeds 18 --val-seeds 6 --test-seeds 12]``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from node import phantom  # noqa: E402
from node.analysis import imaging, ood  # noqa: E402
from training.demo import FINDINGS, MIN_LUNG_FRACTION, series_length  # noqa: E402
from training.ood import FALSE_ALARM_RATE, fit_statistics  # noqa: E402

PHOTOGRAPHS = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "moon", "page", "text", "rocket",
    "grass", "gravel", "brick", "hubble_deep_field", "immunohistochemistry", "retina",
    "colorwheel", "clock", "cell", "checkerboard", "logo", "shepp_logan_phantom",
)  # fmt: skip


def render_study(seed: int, rows: int = 512) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per class, (windowed lung-bearing slices, windowed slices without lungs) of one seed."""
    slices = series_length(seed)
    studies = {}
    for name, finding in FINDINGS.items():
        spec = phantom.PhantomSpec(
            finding=finding, slices=slices, seed=seed, rows=rows, columns=rows
        )
        volume = phantom.generate_hu_volume(spec)
        lungs = np.array([imaging.lung_fraction(hu) >= MIN_LUNG_FRACTION for hu in volume])
        windowed = np.stack([imaging.apply_window(hu, imaging.LUNG) for hu in volume])
        studies[name] = (windowed[lungs], windowed[~lungs])
    return studies


def render(seeds, rows: int = 512, stride: int = 1):
    """Lung slices, labels, study keys and non-lung slices of ``seeds``' studies."""
    images, labels, keys, outside = [], [], [], []
    for seed in seeds:
        for label, (name, (lungs, others)) in enumerate(render_study(seed, rows).items()):
            chosen = lungs[::stride]
            images.append(chosen)
            labels += [label] * len(chosen)
            keys += [f"{seed}-{name}"] * len(chosen)
            outside.append(others)
    return np.concatenate(images), np.array(labels), np.array(keys), np.concatenate(outside)


def _grey(image: np.ndarray, size: int) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 3:
        image = (image[..., :3] @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8)
    if image.dtype != np.uint8:
        span = float(np.ptp(image)) or 1.0
        image = (255 * (image - image.min()) / span).astype(np.uint8)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def photographs(size: int = 512) -> np.ndarray:
    """scikit-image's bundled sample images (no download), grey, ``size`` square."""
    import skimage.data

    return np.stack([_grey(getattr(skimage.data, name)(), size) for name in PHOTOGRAPHS])


def noise_and_blank(size: int = 512, seed: int = 0) -> np.ndarray:
    """Uniform and Gaussian noise, black, white and grey images, and a ramp."""
    rng = np.random.default_rng(seed)
    ramp = np.tile(np.linspace(0, 255, size).astype(np.uint8), (size, 1))
    return np.concatenate(
        [
            rng.integers(0, 256, (4, size, size), dtype=np.uint8),
            rng.normal(128, 40, (4, size, size)).clip(0, 255).astype(np.uint8),
            np.zeros((1, size, size), np.uint8),
            np.full((1, size, size), 255, np.uint8),
            np.full((1, size, size), 128, np.uint8),
            ramp[np.newaxis],
        ]
    )


def head_like(count: int = 12, size: int = 512, seed: int = 0) -> np.ndarray:
    """Synthetic axial head slices in the lung window: air, a skull ring (~1000 HU) around
    brain (~35 HU) with darker ventricles, sizes and noise varied."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    slices = []
    for _ in range(count):
        a, b = rng.uniform(0.55, 0.75), rng.uniform(0.65, 0.9)
        r = (x / a) ** 2 + (y / b) ** 2
        hu = np.full((size, size), -1000.0)
        hu[r <= 1.0] = 1000.0
        hu[r <= rng.uniform(0.8, 0.88)] = 35.0
        ventricles = (x / (0.12 * a)) ** 2 + ((y - 0.05) / (0.3 * b)) ** 2 <= 1
        hu[ventricles] = 5.0
        hu += rng.normal(0, 12, hu.shape)
        slices.append(imaging.apply_window(hu.astype(np.float32), imaging.LUNG))
    return np.stack(slices)


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score of an outside image > score of an inside one), ties counted half."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(outside, inside).statistic / (len(inside) * len(outside)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ood", description=__doc__)
    parser.add_argument("--bundle", default="node/models/demo")
    parser.add_argument("--train-seeds", type=int, default=18, help="every third of 1000-1053")
    parser.add_argument("--val-seeds", type=int, default=6, help="seeds 3000+")
    parser.add_argument("--test-seeds", type=int, default=12, help="seeds 2000+")
    parser.add_argument("--false-alarm-rate", type=float, default=FALSE_ALARM_RATE)
    args = parser.parse_args(argv)
    from node.analysis.bundle import ModelBundle

    started = time.perf_counter()
    bundle = ModelBundle.load(args.bundle, runtime="keras")

    def features(images: np.ndarray) -> np.ndarray:
        return bundle.predict_with_features(images, batch_size=16)[1]

    train = render(range(1000, 1054, 3)[: args.train_seeds], stride=2)
    val = render(range(3000, 3000 + args.val_seeds))
    test = render(range(2000, 2000 + args.test_seeds))
    print(
        f"rendered in {time.perf_counter() - started:.0f} s: train {len(train[0])}, "
        f"validation {len(val[0])}, test {len(test[0])} lung slices"
    )
    arrays, figures = fit_statistics(
        features(train[0]), train[1], features(val[0]), train[0], val[0], 3, args.false_alarm_rate
    )
    means, precision = arrays["means"].astype(np.float64), arrays["precision"].astype(np.float64)
    threshold = figures["threshold"]
    test_scores = ood.slice_distances(means, precision, features(test[0]))
    print(
        f"fitted: shrinkage {figures['shrinkage']:.4f}, threshold {threshold:.1f} "
        f"({1 - args.false_alarm_rate:.0%} of validation slices), median distance "
        f"train {figures['train_distance_median']:.1f}, validation "
        f"{figures['validation_distance_median']:.1f}, test {np.median(test_scores):.1f}"
    )
    sets = {
        "non-chest CT: phantom slices without lungs": test[3],
        "non-chest CT: synthetic head slices": head_like(),
        "photographs (skimage.data)": photographs(),
        "noise and blank images": noise_and_blank(),
    }
    print(f"\n{'out-of-source set':46} {'n':>4} {'AUROC':>6} {'above':>6} {'median':>8}")
    every = []
    for name, images in sets.items():
        scores = ood.slice_distances(means, precision, features(images))
        every.append(scores)
        above = (scores > threshold).mean()
        print(
            f"{name:46} {len(scores):4d} {auroc(test_scores, scores):6.3f} {above:6.1%} "
            f"{np.median(scores):8.1f}"
        )
    print(
        f"{'all out-of-source images':46} {sum(map(len, every)):4d} "
        f"{auroc(test_scores, np.concatenate(every)):6.3f} "
        f"{(np.concatenate(every) > threshold).mean():6.1%}"
    )
    study_false_alarms(test, test_scores, arrays, figures, threshold, args.false_alarm_rate)
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    return 0


class _Holder:
    """What :func:`node.analysis.ood.assess` reads of a bundle: its statistics."""

    def __init__(self, statistics: ood.OodStatistics) -> None:
        self.ood_statistics = statistics


def study_false_alarms(test, scores, arrays, figures, threshold, rate) -> None:
    """The test split's false alarms per slice and per study (as the node flags a study)."""
    header = phantom.generate_series(phantom.PhantomSpec(slices=40))[0]  # 7.5 mm, 360 mm FOV
    statistics = ood.OodStatistics(
        arrays["means"].astype(np.float64),
        arrays["precision"].astype(np.float64),
        threshold,
        arrays["histogram"],
        figures["histogram_threshold"],
        {"false_alarm_rate": rate},
    )
    flagged, by_score = [], []
    for key in dict.fromkeys(test[2]):
        rows = test[2] == key
        study = ood.study_score(scores[rows])
        # without features, assess judges the input checks only (the score is just above)
        result = ood.assess(_Holder(statistics), None, [header], test[0][rows])
        by_score.append(study > threshold)
        flagged.append(study > threshold or result["flagged"])
    print(
        f"\ntest split false alarms: slices {(scores > threshold).mean():.1%} "
        f"(target {rate:.0%}), studies by score {np.mean(by_score):.1%}, studies flagged "
        f"(score, intensity histogram, headers) {np.mean(flagged):.1%} of {len(flagged)}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
