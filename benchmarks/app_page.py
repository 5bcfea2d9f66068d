"""The attribution page (`dmin app`) on the quickstart's pipeline, index and training rows, in headless Chromium:
seconds from clicking "Generate and attribute" to the gallery and table showing the top-k rows (generation with
the quickstart's 250 steps included, and the attribution alone as the page reports it), with HNSW and exact
search; and the page's screenshot for the README (docs/app.png).

    python examples/quickstart.py && python benchmarks/app_page.py

Needs `pip install -e ".[app]" selenium` and the operating system's `chromium` and `chromium-driver`.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

from diffusers import DiffusionPipeline

import dmin_diffusers as dm
from dmin_diffusers.app import build_app, load_app_dataset

from common import DOCS_DIR, RESULTS_DIR, markdown_table, setup_threads, write_report
from browser import attribute_on_page, chromium, free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path("quickstart-output"), help="the quickstart's")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--screenshot", type=Path, default=DOCS_DIR / "app.png")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    setup_threads(1)

    pipe = dm.enable_attribution(DiffusionPipeline.from_pretrained(args.output_dir))
    pipe.set_progress_bar_config(disable=True)
    dataset = load_app_dataset(str(args.output_dir / "train-dataset"))
    pipe.load_attribution_index(args.output_dir / "attribution-index", dataset=dataset)
    demo = build_app(pipe, top_k=args.top_k, num_inference_steps=250, title="DMin attribution: quickstart digits")
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    driver = chromium(width=1400, height=1500)
    rows = []
    try:
        for exact in (False, True):
            totals, attributions = [], []
            for _ in range(args.runs):
                totals.append(attribute_on_page(driver, f"http://127.0.0.1:{port}/", None, args.top_k, exact=exact))
                status = driver.find_element("id", "dmin-status").text
                attributions.append(float(re.search(r"in ([0-9.]+) s", status).group(1)))
            rows.append([
                "exact" if exact else "HNSW", f"{statistics.mean(totals):.2f} ± {statistics.pstdev(totals):.2f}",
                f"{statistics.mean(attributions):.2f} ± {statistics.pstdev(attributions):.2f}",
            ])
        attribute_on_page(driver, f"http://127.0.0.1:{port}/", None, args.top_k)
        time.sleep(1.0)  # let the gallery's images finish fading in
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.screenshot))
    finally:
        driver.quit()
        demo.close()
    table = markdown_table(["search", "submit to gallery (s)", "of which attribution (s)"], rows)
    about = (
        f"The quickstart's {pipe.attribution_index.num_rows:,} rows, top-{args.top_k}, headless Chromium, "
        f"{args.runs} submits each (mean ± std); a submit generates a digit (250 steps) and attributes it."
    )
    write_report("app-page", [("Submit to gallery", about + "\n\n" + table)], quick=False,
                 results_dir=args.results_dir)


if __name__ == "__main__":
    main()
