"""Data for the quality benchmark, made in code: a text-to-image set of distinct subsets drawn with PIL, and
scikit-learn's digits at their native 8x8."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
COLOURS = {
    "red": (215, 40, 40), "orange": (240, 140, 30), "yellow": (235, 215, 40), "green": (40, 165, 60),
    "blue": (40, 80, 215), "purple": (140, 50, 180), "pink": (240, 120, 180), "white": (245, 245, 245),
}
#: 48 card names, so that held-out card prompts exist at every data set size
NAMES = [a + b for a in ("Em", "Fro", "Ga", "Tho", "As", "Ti", "Du", "Spa")
         for b in ("ber", "st", "le", "rn", "sk", "dra")]

Drawer = Callable[[np.random.Generator], tuple[Image.Image, str]]


def _colour(rng: np.random.Generator, exclude: tuple[str, ...] = ()) -> tuple[str, tuple[int, int, int]]:
    name = str(rng.choice([c for c in COLOURS if c not in exclude]))
    return name, COLOURS[name]


def draw_flower(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """Petals (ellipses) around a yellow centre, on a green stem, on a pale green or pale blue background."""
    name, rgb = _colour(rng, ("green", "yellow"))
    petals = int(rng.integers(4, 9))
    size = str(rng.choice(["small", "large"]))
    backdrop = str(rng.choice(["green", "blue"]))
    image = Image.new("RGB", (SIZE, SIZE), {"green": (200, 230, 200), "blue": (200, 215, 240)}[backdrop])
    draw = ImageDraw.Draw(image)
    cx, cy = SIZE / 2 + rng.uniform(-3, 3), SIZE / 2 - 3 + rng.uniform(-2, 2)
    reach, radius = (5, 3) if size == "small" else (7, 5)
    draw.line([(cx, cy), (cx, SIZE)], fill=(30, 120, 40), width=2)
    for i in range(petals):
        angle = 2 * np.pi * i / petals + rng.uniform(0, 0.5)
        px, py = cx + reach * np.cos(angle), cy + reach * np.sin(angle)
        draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=rgb)
    draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=COLOURS["yellow"])
    return image, f"a {size} {name} flower with {petals} petals on a pale {backdrop} background"


def draw_lego(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A box (dark outline) holding a grid of bricks with studs."""
    name, rgb = _colour(rng, ("white",))
    rows = int(rng.integers(2, 5))
    image = Image.new("RGB", (SIZE, SIZE), (250, 250, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle([2, 2, SIZE - 3, SIZE - 3], outline=(20, 20, 20), width=2)
    height = (SIZE - 10) / rows
    for r in range(rows):
        y = 5 + r * height
        for x in range(5, SIZE - 8, 8):
            draw.rectangle([x, y, x + 6, y + height - 2], fill=rgb, outline=(30, 30, 30))
            draw.ellipse([x + 2, y + 1, x + 4, y + 3], fill=(255, 255, 255))
    return image, f"a lego set box with {name} bricks in {rows} rows"


def draw_card(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A framed card: coloured border, dark art window, a text line."""
    name, rgb = _colour(rng)
    title = str(rng.choice(NAMES))
    image = Image.new("RGB", (SIZE, SIZE), (20, 20, 20))
    draw = ImageDraw.Draw(image)
    draw.rectangle([3, 1, SIZE - 4, SIZE - 2], fill=rgb)
    draw.rectangle([6, 6, SIZE - 7, 18], fill=tuple(int(v * 0.3) for v in rgb))
    draw.rectangle([6, 21, SIZE - 7, SIZE - 5], fill=(235, 225, 200))
    draw.text((7, 20), title[:4], fill=(0, 0, 0))
    return image, f"a magic card called {title} with a {name} frame"


def draw_landscape(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """Sky, sun and a hill line."""
    sky_name, sky = str(rng.choice(["blue", "orange", "purple"])), None
    sky = {"blue": (120, 170, 235), "orange": (240, 170, 100), "purple": (110, 80, 150)}[sky_name]
    ground_name = str(rng.choice(["green", "yellow", "white"]))
    image = Image.new("RGB", (SIZE, SIZE), sky)
    draw = ImageDraw.Draw(image)
    sx, sy = rng.uniform(5, SIZE - 5), rng.uniform(4, 12)
    draw.ellipse([sx - 3, sy - 3, sx + 3, sy + 3], fill=(255, 240, 150))
    heights = SIZE * rng.uniform(0.5, 0.8, size=5)
    points = [(i * SIZE / 4, float(h)) for i, h in enumerate(heights)] + [(SIZE, SIZE), (0, SIZE)]
    draw.polygon(points, fill=COLOURS[ground_name])
    return image, f"a landscape with {ground_name} hills under a {sky_name} sky"


def draw_pattern(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """Stripes or a checkerboard in two colours."""
    (a, rgb_a), kind = _colour(rng), str(rng.choice(["stripes", "checkerboard"]))
    b, rgb_b = _colour(rng, (a,))
    cell = int(rng.integers(3, 7))
    image = Image.new("RGB", (SIZE, SIZE), rgb_b)
    draw = ImageDraw.Draw(image)
    for i in range(0, SIZE, cell):
        for j in range(0, SIZE, cell):
            on = (i // cell) % 2 == 0 if kind == "stripes" else ((i + j) // cell) % 2 == 0
            if on:
                draw.rectangle([i, j, i + cell - 1, j + cell - 1], fill=rgb_a)
    return image, f"a {a} and {b} {kind} pattern"


#: name -> (drawer, share of the training rows). Lego is under 1 % of the rows, as in the paper.
SUBSETS: dict[str, tuple[Drawer, float]] = {
    "landscapes": (draw_landscape, 0.40),
    "cards": (draw_card, 0.28),
    "flowers": (draw_flower, 0.16),
    "patterns": (draw_pattern, 0.152),
    "lego": (draw_lego, 0.008),
}
EVALUATED = ("flowers", "lego", "cards")


def _noisy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 5, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _shuffled_dataset(rows: list[tuple], rng: np.random.Generator):
    """``datasets.Dataset`` with "image", "text" and "subset" from (image, text, subset) rows, shuffled by ``rng``."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    order = rng.permutation(len(rows))
    features = Features({"image": ImageFeature(), "text": Value("string"), "subset": Value("string")})
    return Dataset.from_dict(
        {key: [rows[i][k] for i in order] for k, key in enumerate(("image", "text", "subset"))}, features=features
    )


def make_t2i_dataset(num_rows: int, seed: int = 0):
    """``datasets.Dataset`` with "image" (32x32 RGB), "text" and "subset", rows of the subsets shuffled."""
    counts = {name: max(1, int(round(share * num_rows))) for name, (_, share) in SUBSETS.items()}
    counts["landscapes"] += num_rows - sum(counts.values())
    rng = np.random.default_rng(seed)
    rows = []
    for name, count in counts.items():
        drawer = SUBSETS[name][0]
        for _ in range(count):
            image, caption = drawer(rng)
            rows.append((_noisy(image, rng), caption, name))
    return _shuffled_dataset(rows, rng)


#: DreamBooth instance sets: name -> (the drawer of its class, images, instance prompt, class prompt), as
#: ``train_dreambooth_lora.py --instance_prompt ... --class_prompt ...`` (a rare token naming one object)
INSTANCES: dict[str, tuple[str, int, str, str]] = {
    "sks flower": ("flowers", 5, "a photo of sks flower", "a photo of a flower"),
    "zwx card": ("cards", 10, "a photo of zwx card", "a photo of a card"),
    "qrt lego": ("lego", 20, "a photo of qrt lego set", "a photo of a lego set"),
}
#: prior-preservation rows per class (one class prompt each), besides the classes of the instances
CLASS_PROMPTS = {"landscapes": "a photo of a landscape", "patterns": "a photo of a pattern"}


def _instance_view(identity: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Another photo of the same object: shifted by up to 3 pixels and lit 15 % brighter or darker."""
    shift = rng.integers(-3, 4, size=2)
    pixels = np.roll(np.asarray(identity, dtype=np.float32), tuple(int(v) for v in shift), axis=(0, 1))
    return Image.fromarray(np.clip(pixels * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8))


def make_dreambooth_dataset(class_rows: int, seed: int = 0):
    """DreamBooth with prior preservation: each of ``INSTANCES`` is one drawn object photographed several times,
    every photo captioned with its instance prompt; ``class_rows`` other rows per class carry only their class
    prompt. Columns "image", "text" and "subset" (the instance's name, or "class: <subset>"), shuffled."""
    rng = np.random.default_rng([seed, 11])
    rows = []
    for name, (subset, count, instance_prompt, _) in INSTANCES.items():
        identity, _ = SUBSETS[subset][0](rng)
        rows += [(_noisy(_instance_view(identity, rng), rng), instance_prompt, name) for _ in range(count)]
    classes = {subset: class_prompt for subset, _, _, class_prompt in INSTANCES.values()} | CLASS_PROMPTS
    for subset, class_prompt in classes.items():
        rows += [(_noisy(SUBSETS[subset][0](rng)[0], rng), class_prompt, f"class: {subset}")
                 for _ in range(class_rows)]
    return _shuffled_dataset(rows, rng)


def heldout_prompts(subset: str, count: int, excluded: set[str], seed: int = 1) -> list[str]:
    """``count`` captions of ``subset`` that are not in ``excluded`` (the training captions, and the prompts of
    another query set), drawn with ``seed``."""
    rng = np.random.default_rng([seed, len(subset)])
    prompts: list[str] = []
    for _ in range(200 * count):
        _, caption = SUBSETS[subset][0](rng)
        if caption not in excluded and caption not in prompts:
            prompts.append(caption)
        if len(prompts) == count:
            return prompts
    raise ValueError(f"the training set holds nearly every {subset} caption: only {len(prompts)} of {count} "
                     "held-out prompts found")


def load_digit_rows(num_rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``num_rows`` of scikit-learn's digits: (pixels in [-1, 1] as (N, 1, 8, 8) float32, labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = np.sort(np.random.default_rng(seed).choice(len(digits.target), size=num_rows, replace=False))
    pixels = digits.images[rows].astype(np.float32) / 8.0 - 1.0
    return pixels[:, None], digits.target[rows]


def digits_classifier():
    """Logistic regression on all 1,797 8x8 digits (features 0..16), as the reader of generated digits."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    return LogisticRegression(max_iter=3000).fit(digits.data, digits.target)


GENERIC_SHAPES = ("triangle", "diamond", "ring", "cross")
GENERIC_BACKGROUNDS = {"gray": (128, 128, 128), "black": (20, 20, 25), "beige": (225, 210, 180), "teal": (40, 120, 120)}


def _draw_generic_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb) -> None:
    if shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=rgb)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=rgb, width=2)
    else:
        draw.line([(cx - r, cy), (cx + r, cy)], fill=rgb, width=2)
        draw.line([(cx, cy - r), (cx, cy + r)], fill=rgb, width=2)


def draw_generic(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """The pre-training corpus: one or two free-floating primitives (triangle, diamond, ring, cross) on a plain
    background. None of the fine-tuning subsets' motifs (petals, bricks, frames, hills, stripes) appears."""
    background = str(rng.choice(list(GENERIC_BACKGROUNDS)))
    image = Image.new("RGB", (SIZE, SIZE), GENERIC_BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    parts = []
    for _ in range(int(rng.integers(1, 3))):
        shape = str(rng.choice(GENERIC_SHAPES))
        name, rgb = _colour(rng)
        _draw_generic_shape(draw, shape, rng.uniform(7, SIZE - 7), rng.uniform(7, SIZE - 7), rng.uniform(3, 7), rgb)
        parts.append(f"a {name} {shape}")
    return image, " and ".join(parts) + f" on a {background} background"


def make_generic_dataset(num_rows: int, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """``num_rows`` images and captions of the generic pre-training corpus (:func:`draw_generic`)."""
    rng = np.random.default_rng([seed, 7])
    drawn = [draw_generic(rng) for _ in range(num_rows)]
    return [_noisy(image, rng) for image, _ in drawn], [caption for _, caption in drawn]
