"""How much bounded concurrency buys the LLM fact extractor: the local stub server with a fixed per-request
latency, N distinct items, each concurrency level on a fresh cache.

    .venv/bin/python benchmarks/llm_concurrency.py [--items 64] [--latency 0.1] [--concurrency 1 8]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fgaif_utils.llm import OpenAIFactExtractor  # noqa: E402
from openai_stub import StubServer  # noqa: E402

SUBSENTENCES = ["there is a large red heart", "a small blue square is to the left of a green triangle",
                "there is no circle", "the star is above the ring"]


def run(stub, items, concurrency):
    """Wall seconds of one extraction on a fresh cache (every item must be a fresh successful call)."""
    with tempfile.TemporaryDirectory() as cache_dir:
        extractor = OpenAIFactExtractor("gpt-3.5-turbo-0125", base_url=stub.url, cache_dir=cache_dir,
                                        concurrency=concurrency, progress=False)
        start = time.perf_counter()
        results = extractor.extract_many(items)
        wall = time.perf_counter() - start
    not_fresh = sum(result["status"] != "ok" or result["cached"] for result in results)
    if not_fresh:
        raise RuntimeError(f"{not_fresh} of {len(items)} items were not fresh successful calls")
    return wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.1, help="server-side seconds per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    # Distinct contexts make every item a distinct request (no cache sharing between items).
    items = [(SUBSENTENCES[i % len(SUBSENTENCES)], f"image {i}: " + " . ".join(SUBSENTENCES))
             for i in range(args.items)]
    with StubServer(latency=args.latency) as stub:
        walls = {concurrency: run(stub, items, concurrency) for concurrency in args.concurrency}
    baseline = walls[args.concurrency[0]]
    print(f"{args.items} items, {args.latency * 1000:.0f} ms server latency per request")
    print(f"{'concurrency':>11} {'wall s':>8} {'items/s':>8} {'speed-up':>9}")
    for concurrency, wall in walls.items():
        print(f"{concurrency:>11} {wall:>8.2f} {args.items / wall:>8.1f} {baseline / wall:>8.2f}x")


if __name__ == "__main__":
    main()
