"""A page to look at attributions (Gradio): ``build_app(pipe)``, and ``dmin app`` from the shell.

The page generates an image from a prompt (or takes an uploaded one), attributes it with the index attached to the
pipeline, and shows the top-k training rows with their rank, row id, score and caption, how long it took, and
which timesteps (noise levels) each score comes from. Everything the page shows is computed by the plain
functions here (:func:`generate_image`, :func:`explain`), so they can be used and tested without a browser.
Gradio is an optional dependency: ``pip install "dmin-diffusers[app]"``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import PIL.Image
import torch
from huggingface_hub import constants
from PIL import ImageDraw

from .families import detect_family
from .index import AttributionIndex
from .inputs import to_pil
from .mixin import InfluenceMixin
from .search import DEFAULT_TOP_K
from .result import AttributionResult

#: rows drawn in the per-timestep chart (the chart of 10 lines is unreadable)
CHART_ROWS = 5
#: training images smaller than this are enlarged (nearest neighbour) for the gallery
MIN_TILE = 128
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


@dataclass
class PageAnswer:
    """What the page shows for one query."""

    query: PIL.Image.Image
    gallery: list[tuple[PIL.Image.Image, str]]
    table: str
    chart: PIL.Image.Image
    status: str
    result: AttributionResult


#: the page's default number of generation steps
DEFAULT_NUM_INFERENCE_STEPS = 30

def _require_pipeline(pipe: Any) -> InfluenceMixin:
    if not isinstance(pipe, InfluenceMixin):
        raise TypeError("the page needs a pipeline with attribution: dmin_diffusers.enable_attribution(pipe) first")
    if pipe.attribution_index is None:
        raise ValueError("attach an index first: pipe.load_attribution_index(...) or pipe.build_attribution_index(...)")
    return pipe


def _takes_prompt(pipe: InfluenceMixin) -> bool:
    """Whether the pipeline's family (the one its attached index was checked against) conditions on a prompt."""
    return detect_family(pipe).takes_prompt


def generate_image(pipe: Any, prompt: str | None, seed: int, num_inference_steps: int,
                   guidance_scale: float | None = None) -> PIL.Image.Image:
    """One image from the pipeline, seeded; text-to-image models generate at the index's training resolution."""
    pipe = _require_pipeline(pipe)
    generator = torch.Generator().manual_seed(int(seed))
    call: dict[str, Any] = {"num_inference_steps": int(num_inference_steps), "generator": generator}
    if _takes_prompt(pipe):
        if not prompt:
            raise ValueError("type a prompt to generate from")
        size = pipe.attribution_index.config.resolution
        call.update(prompt=prompt, height=size, width=size)
        if guidance_scale is not None:
            call["guidance_scale"] = float(guidance_scale)
    return pipe(**call).images[0]


def explain(pipe: Any, image: Any, prompt: str | None = None, top_k: int = DEFAULT_TOP_K,
            exact: bool = False) -> PageAnswer:
    """Attributes ``image`` and lays the answer out for the page: a gallery, a table, a chart and a status line."""
    pipe = _require_pipeline(pipe)
    if not _takes_prompt(pipe):
        prompt = None
    start = time.perf_counter()
    result = pipe.attribute(image, prompt, top_k=int(top_k), exact=bool(exact))
    seconds = time.perf_counter() - start
    index = pipe.attribution_index
    info = index.dataset_info
    examples = result.examples
    captions = [_caption(row, result.caption_column) for row in examples] or [""] * len(result.indices)
    gallery = []
    for rank, (row, score) in enumerate(zip(result.indices, result.scores), start=1):
        picture = _tile(examples[rank - 1].get(result.image_column)) if examples else None
        label = f"#{rank} · row {row} · {score:.3f}" + (f" · {captions[rank - 1]}" if captions[rank - 1] else "")
        gallery.append((picture if picture is not None else _placeholder(), label))
    how = "exact: every row scored" if result.exact else "HNSW candidates re-ranked exactly"
    status = f"top-{len(result.indices)} of {index.num_rows:,} rows in {seconds:.2f} s ({how})"
    if not examples and result.examples_unavailable_reason:
        status += f"; images unavailable: {result.examples_unavailable_reason}"
    return PageAnswer(
        query=_tile(result.image),
        gallery=gallery,
        table=_table(result, captions, index.config.timesteps, info),
        chart=timestep_chart(result.timestep_scores, index.config.timesteps, result.indices),
        status=status,
        result=result,
    )


def row_link(dataset_info: dict[str, Any], row: int) -> str | None:
    """The Hub dataset viewer's page of ``row``, for an index whose rows are a Hub dataset (else ``None``)."""
    name = dataset_info.get("name")
    if not name or "/" not in name or os.path.exists(name):
        return None
    config = dataset_info.get("config_name") or "default"
    split = dataset_info.get("split") or "train"
    return f"{constants.ENDPOINT}/datasets/{name}/viewer/{config}/{split}?row={int(row)}"


def timestep_chart(timestep_scores: np.ndarray, timesteps: list[int], rows: list[int],
                   size: tuple[int, int] = (480, 240)) -> PIL.Image.Image:
    """A small line chart of each top row's score at each timestep (noise grows to the right)."""
    width, height = size
    chart = PIL.Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(chart)
    scores = np.asarray(timestep_scores, dtype=np.float64)[:CHART_ROWS]
    left, right, top, bottom = 44, width - 96, 12, height - 28
    draw.rectangle((left, top, right, bottom), outline="#999999")
    if scores.size == 0:
        return chart
    low, high = float(scores.min()), float(scores.max())
    pad = 0.08 * (high - low) or 0.05 * max(abs(high), 1e-6)
    low, high = low - pad, high + pad
    x_of = (lambda i: left + (right - left) * i / max(1, len(timesteps) - 1))  # noqa: E731
    y_of = (lambda v: bottom - (bottom - top) * (v - low) / (high - low))  # noqa: E731
    if low < 0 < high:
        draw.line((left, y_of(0.0), right, y_of(0.0)), fill="#cccccc")
    for value in (low, high):
        draw.text((2, y_of(value) - 6), f"{value:.2f}", fill="black")
    for i, timestep in enumerate(timesteps):
        draw.text((x_of(i) - 8, bottom + 4), str(timestep), fill="black")
    draw.text((left, height - 12), "timestep (more noise to the right)", fill="#555555")
    for number, (row, line) in enumerate(zip(rows, scores)):
        colour = _COLOURS[number % len(_COLOURS)]
        points = [(x_of(i), y_of(v)) for i, v in enumerate(line)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((right + 8, top + 14 * number), f"#{number + 1} row {row}", fill=colour)
    return chart


def _caption(row: dict[str, Any], column: str | None) -> str:
    text = str(row.get(column) or "") if column else ""
    return text if len(text) <= 80 else text[:77] + "..."


def _tile(image: Any) -> PIL.Image.Image | None:
    if image is None:
        return None
    picture = to_pil(image).convert("RGB")
    if min(picture.size) < MIN_TILE:
        scale = -(-MIN_TILE // min(picture.size))
        picture = picture.resize((picture.width * scale, picture.height * scale), PIL.Image.NEAREST)
    return picture


def _placeholder() -> PIL.Image.Image:
    return PIL.Image.new("RGB", (MIN_TILE, MIN_TILE), "#eeeeee")


def _table(result: AttributionResult, captions: list[str], timesteps: list[int], info: dict[str, Any]) -> str:
    with_captions = result.caption_column is not None
    lines = ["| rank | row | score | strongest timestep |" + (" caption |" if with_captions else ""),
             "|---|---|---|---|" + ("---|" if with_captions else "")]
    for rank, (row, score, caption, split) in enumerate(
        zip(result.indices, result.scores, captions, result.timestep_scores), start=1
    ):
        link = row_link(info, row)
        shown = f"[{row}]({link})" if link else str(row)
        line = f"| {rank} | {shown} | {score:.3f} | {timesteps[int(np.argmax(split))]} |"
        lines.append(line + (f" {caption.replace('|', '/') or '—'} |" if with_captions else ""))
    return "\n".join(lines)


def build_app(pipe: Any, *, top_k: int = DEFAULT_TOP_K, num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
              guidance_scale: float = 7.5, title: str = "DMin attribution"):
    """A ``gradio.Blocks`` page for a pipeline with an attribution index attached; ``.launch()`` it.

    Args:
        pipe: a pipeline with attribution (``enable_attribution``) and an index (``load_attribution_index``).
        top_k: how many training rows the page shows by default.
        num_inference_steps, guidance_scale: the generation defaults (guidance only for text-to-image models).
        title: the page's title.
    """
    gr = _import_gradio()
    pipe = _require_pipeline(pipe)
    index = pipe.attribution_index
    takes_prompt = _takes_prompt(pipe)
    on_generate, on_upload = _page_handlers(gr, pipe, takes_prompt)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(_page_heading(title, index))
        with gr.Row():
            with gr.Column(scale=1):
                controls = _page_controls(gr, index.num_rows, takes_prompt, top_k, num_inference_steps,
                                          guidance_scale)
            with gr.Column(scale=2):
                outputs = _page_outputs(gr)
        controls.generate.click(on_generate, [controls.prompt, controls.seed, controls.steps, controls.guidance,
                                              controls.k, controls.exact], outputs)
        controls.attribute.click(on_upload, [controls.upload, controls.prompt, controls.k, controls.exact], outputs)
    return demo


def _import_gradio() -> ModuleType:
    try:
        import gradio as gr
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('the page needs Gradio: pip install "dmin-diffusers[app]"') from error
    return gr


def _page_heading(title: str, index: AttributionIndex) -> str:
    config = index.config
    return (
        f"# {title}\n{index.num_rows:,} training rows of a `{config.family}` model · T = {config.num_timesteps} "
        f"timesteps, K = {config.projection_dim} · which training images shaped this image?"
    )


def _page_handlers(gr: ModuleType, pipe: InfluenceMixin, takes_prompt: bool) -> tuple[Callable, Callable]:
    """The page's two actions, ``(on_generate, on_upload)``: each returns the outputs of :func:`_page_outputs`,
    and shows a bad input as a Gradio error."""

    def answer(image, prompt, k, exact):
        try:
            page = explain(pipe, image, prompt, k, exact)
        except (ValueError, TypeError) as error:
            raise gr.Error(str(error)) from None
        return page.query, page.gallery, page.table, page.chart, page.status

    def on_generate(prompt, seed, steps, guidance, k, exact):
        try:
            image = generate_image(pipe, prompt, seed, steps, guidance if takes_prompt else None)
        except (ValueError, TypeError) as error:
            raise gr.Error(str(error)) from None
        return answer(image, prompt, k, exact)

    def on_upload(image, prompt, k, exact):
        if image is None:
            raise gr.Error("upload an image first")
        return answer(image, prompt, k, exact)

    return on_generate, on_upload


@dataclass
class _PageControls:
    """The page's input components and buttons."""

    prompt: Any
    seed: Any
    steps: Any
    guidance: Any
    generate: Any
    upload: Any
    attribute: Any
    k: Any
    exact: Any


def _page_controls(gr: ModuleType, num_rows: int, takes_prompt: bool, top_k: int, num_inference_steps: int,
                   guidance_scale: float) -> _PageControls:
    """The left column: prompt, generation settings, upload, top-k and exact search (created in page order)."""
    prompt = gr.Textbox(label="prompt", visible=takes_prompt, elem_id="dmin-prompt", lines=2)
    with gr.Row():
        seed = gr.Number(label="seed", value=0, precision=0, elem_id="dmin-seed")
        steps = gr.Slider(1, 1000, value=num_inference_steps, step=1, label="steps")
        guidance = gr.Slider(1.0, 15.0, value=guidance_scale, step=0.5, label="guidance", visible=takes_prompt)
    generate = gr.Button("Generate and attribute", variant="primary", elem_id="dmin-generate")
    upload = gr.Image(label="or upload an image" + (" (with its prompt above)" if takes_prompt else ""),
                      type="pil", elem_id="dmin-upload")
    attribute = gr.Button("Attribute the uploaded image", elem_id="dmin-attribute")
    with gr.Row():
        k = gr.Slider(1, min(50, num_rows), value=min(top_k, num_rows), step=1, label="top-k", elem_id="dmin-top-k")
        exact = gr.Checkbox(label="exact (score every row)", value=False, elem_id="dmin-exact")
    return _PageControls(prompt, seed, steps, guidance, generate, upload, attribute, k, exact)


def _page_outputs(gr: ModuleType) -> list[Any]:
    """The right column, created in page order; returned as ``[query, gallery, table, chart, status]``, the order
    of :class:`PageAnswer`'s fields that the handlers return."""
    status = gr.Markdown(elem_id="dmin-status")
    query = gr.Image(label="query", type="pil", interactive=False, height=256, elem_id="dmin-query")
    gallery = gr.Gallery(label="most influential training rows", columns=5, height=330, object_fit="contain",
                         elem_id="dmin-gallery")
    chart = gr.Image(label="score per timestep", type="pil", interactive=False, elem_id="dmin-chart")
    table = gr.Markdown(elem_id="dmin-rows")
    return [query, gallery, table, chart, status]


def load_app_dataset(dataset_name: str | None, dataset_config_name: str | None = None,
                     train_data_dir: str | None = None):
    """The training rows for the page: a ``save_to_disk`` directory, an imagefolder or a Hub dataset (``None``
    when none is given; the index's own Hub reference is then used, if it has one)."""
    import datasets

    from .training_data import load_training_dataset

    if dataset_name and os.path.isdir(dataset_name) and os.path.exists(os.path.join(dataset_name, "state.json")):
        return datasets.load_from_disk(dataset_name)
    if dataset_name or train_data_dir:
        return load_training_dataset(dataset_name=dataset_name, dataset_config_name=dataset_config_name,
                                     train_data_dir=train_data_dir)
    return None
