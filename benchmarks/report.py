"""Turn a results file into a markdown report and PNG plots, with the targets beside the numbers.

    python -m benchmarks.report                 # the newest file in benchmarks/results/
    python -m benchmarks.report A.json B.json   # several files merged (later records win), e.g. two sessions

Writes <results stem>.md and <results stem>-*.png beside the (last) results file, or under --out.
"""
import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .cases import BANDWIDTH_TARGET_MIN_BYTES
from .results import record_key, results_dir

BASELINES = ("eager", "compile", "compile-reduce-overhead")
PROVIDER_ORDER = ("eager", "compile", "compile-reduce-overhead", "mbkernels-cuda", "mbkernels-triton",
                  "mbkernels-reference", "patched", "patched+compile", "patched+tuned", "patched+tuned+compile",
                  "patched-cudagraph", "patched-reference", "patched-layers", "patched-blocks")
RESULTS_NAME = re.compile(r".+-(\d{8})\.json$")


def _headline_model(r: dict) -> bool:
    return r["batch"] == 256 and r["dtype"] == "float16" and r["layout"] == "channels_last"


def _large_layer(r: dict) -> bool:
    return r.get("tensor_bytes", 0) > BANDWIDTH_TARGET_MIN_BYTES


@dataclass(frozen=True)
class Target:
    """ours / baseline speedup (or ours' fraction of copy bandwidth when baseline is None) >= threshold."""
    name: str
    family: str
    op: Optional[str]  # layer op, None for models
    ours: tuple  # the providers held to it
    baseline: Optional[str]
    threshold: float
    applies: Callable[[dict], bool] = lambda record: True
    where: str = "every case"

    def covers(self, provider: str) -> bool:
        return provider in self.ours


FUSED = ("mbkernels-cuda", "mbkernels-triton")
TARGETS = (
    Target("fused dwconv: fraction of copy bandwidth", "layer", "dwconv_bn_act", FUSED, None, 0.85,
           _large_layer, "input > 16 MiB"),
    Target("fused dwconv: speedup over eager", "layer", "dwconv_bn_act", FUSED, "eager", 2.5),
    Target("fused dwconv: speedup over compile", "layer", "dwconv_bn_act", FUSED, "compile", 1.5),
    Target("fused SE: speedup over eager", "layer", "squeeze_excite", FUSED, "eager", 3.0),
    Target("fused SE: speedup over compile", "layer", "squeeze_excite", FUSED, "compile", 1.3),
    Target("model: patched over eager", "model", None, ("patched",), "eager", 1.6, _headline_model,
           "batch 256 float16 channels_last"),
    Target("model: patched+compile over compile", "model", None, ("patched+compile",), "compile", 1.25,
           _headline_model, "batch 256 float16 channels_last"),
    Target("model: tuned, never slower than stock (patched+tuned over eager)", "model", None, ("patched+tuned",),
           "eager", 1.0),
    Target("model: tuned and compiled, patched+tuned+compile over compile", "model", None,
           ("patched+tuned+compile",), "compile", 1.0),
    Target("model: CUDA-graph latency, patched-cudagraph over compile-reduce-overhead", "model", None,
           ("patched-cudagraph",), "compile-reduce-overhead", 1.0, lambda r: r["batch"] == 1, "batch 1"),
    Target("model: every block fused, patched-blocks over compile (issue 12)", "model", None, ("patched-blocks",),
           "compile", 2.0, _headline_model, "batch 256 float16 channels_last"),
)


# --------------------------------------------------------------------------------------------- loading
def newest_results(directory: Path) -> Path:
    candidates = [p for p in Path(directory).glob("*.json") if RESULTS_NAME.match(p.name)]
    if not candidates:
        raise FileNotFoundError(
            f"no results file (<gpu>-<yyyymmdd>.json) in {directory}; run pytest benchmarks/ on a GPU")
    return max(candidates, key=lambda p: (RESULTS_NAME.match(p.name).group(1), p.stat().st_mtime))


def load_records(paths) -> list:
    merged = {}
    for path in paths:
        for record in json.loads(Path(path).read_text()):
            merged[record_key(record)] = record
    return list(merged.values())


def group_cases(records: list) -> dict:
    """{(family, op): {case: {provider: record}}} in first-seen order."""
    groups: dict = {}
    for r in records:
        key = (r["family"], r.get("op"))
        groups.setdefault(key, {}).setdefault(r["case"], {})[r["provider"]] = r
    return groups


def _ok(record: Optional[dict]) -> bool:
    return record is not None and record.get("status", "ok") == "ok" and record.get("median_ms")


# ------------------------------------------------------------------------------------------ evaluation
def target_value(target: Target, providers: dict, ours: str) -> Optional[float]:
    mine = providers.get(ours)
    if not _ok(mine) or not target.applies(mine):
        return None
    if target.baseline is None:
        return mine.get("frac_of_copy_bw")
    base = providers.get(target.baseline)
    return base["median_ms"] / mine["median_ms"] if _ok(base) else None


def shortfall(value: float, threshold: float) -> float:
    """How far below the threshold, as a fraction of it (0 when met)."""
    return max(0.0, (threshold - value) / threshold)


def evaluate(groups: dict) -> list:
    """Per target: (target, [(case, provider, value, met)])."""
    outcome = []
    for target in TARGETS:
        rows = []
        for case, providers in groups.get((target.family, target.op), {}).items():
            for provider in providers:
                if target.covers(provider):
                    value = target_value(target, providers, provider)
                    if value is not None:
                        rows.append((case, provider, value, value >= target.threshold))
        outcome.append((target, rows))
    return outcome


# ------------------------------------------------------------------------------------------- rendering
def _fmt_value(value: float, baseline: Optional[str]) -> str:
    return f"{value:.0%}" if baseline is None else f"{value:.2f}x"


def _fmt_check(value: float, target: Target) -> str:
    text = _fmt_value(value, target.baseline)
    if value >= target.threshold:
        return f"{text} ✓"
    want = _fmt_value(target.threshold, target.baseline)
    return f"{text} ✗ (target {want}, short by {shortfall(value, target.threshold):.0%})"


def _ordered(providers) -> list:
    known = [p for p in PROVIDER_ORDER if p in providers]
    return known + sorted(p for p in providers if p not in PROVIDER_ORDER)


def _ms_cell(record: Optional[dict]) -> str:
    if record is None:
        return "—"
    if record.get("status", "ok") != "ok":
        return record["status"]
    return f"{record['median_ms']:.4g}"


def _targets_for(family: str, op: Optional[str]) -> list:
    return [t for t in TARGETS if t.family == family and t.op == op]


def _table(family: str, op: Optional[str], cases: dict) -> list:
    providers = _ordered({p for per_case in cases.values() for p in per_case})
    ours = [p for p in providers if p not in BASELINES]
    baselines = [b for b in BASELINES if b in providers]
    pairs = [(o, b) for o in ours for b in baselines
             if not (b == "compile-reduce-overhead" and o != "patched-cudagraph")]
    header = ["case"] + [f"{p} ms" for p in providers] + [f"{o} vs {b}" for o, b in pairs]
    header += [f"{o} of copy BW" for o in ours] if family == "layer" else ["best img/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    targets = _targets_for(family, op)
    for case, per_case in cases.items():
        cells = [case] + [_ms_cell(per_case.get(p)) for p in providers]
        for o, b in pairs:
            cells.append(_pair_cell(per_case, o, b, [t for t in targets if t.baseline == b and t.covers(o)]))
        if family == "layer":
            cells += [_pair_cell(per_case, o, None, [t for t in targets if t.baseline is None and t.covers(o)])
                      for o in ours]
        else:
            cells.append(_best_throughput(per_case))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _best_throughput(per_case: dict) -> str:
    timed = [(r["images_per_s"], p) for p, r in per_case.items() if _ok(r)]
    return f"{max(timed)[0]:.0f} ({max(timed)[1]})" if timed else "—"


def _pair_cell(per_case: dict, ours: str, baseline: Optional[str], targets: list) -> str:
    for target in targets:
        value = target_value(target, per_case, ours)
        if value is not None:
            return _fmt_check(value, target)
    mine, base = per_case.get(ours), per_case.get(baseline) if baseline else None
    if not _ok(mine):
        return "—"
    if baseline is None:
        fraction = mine.get("frac_of_copy_bw")
        return f"{fraction:.0%}" if fraction is not None else "—"
    return f"{base['median_ms'] / mine['median_ms']:.2f}x" if _ok(base) else "—"


def _summary(outcome: list) -> list:
    lines = ["| target | where | met | worst miss |", "|---|---|---|---|"]
    for target, rows in outcome:
        name = f"{target.name} >= {_fmt_value(target.threshold, target.baseline)}"
        if not rows:
            lines.append(f"| {name} | {target.where} | not measured | |")
            continue
        met = sum(1 for row in rows if row[3])
        misses = sorted((row for row in rows if not row[3]), key=lambda row: row[2] / target.threshold)
        worst = ""
        if misses:
            case, provider, value, _ = misses[0]
            worst = f"{provider} on {case}: {_fmt_check(value, target)}"
        lines.append(f"| {name} | {target.where} | {met} of {len(rows)} | {worst} |")
    return lines


def _environment_line(records: list) -> str:
    fields = ("gpu", "torch", "triton", "cuda", "date")
    seen = {f: sorted({str(r.get(f)) for r in records}) for f in fields}
    return ", ".join(f"{f} {'/'.join(values)}" for f, values in seen.items())


def render_markdown(records: list, sources: list, plots: list) -> str:
    groups = group_cases(records)
    copy_bw = sorted({round(r["copy_gbps"]) for r in records if r.get("copy_gbps")})
    modes = sorted({f"{r['provider']}: {r['compile_mode']}" for r in records if r.get("compile_mode")})
    lines = [
        "# mbkernels benchmarks",
        "",
        f"{_environment_line(records)}. Device-to-device copy bandwidth (read + written): "
        f"{', '.join(f'{b} GB/s' for b in copy_bw) or 'not measured'}.",
        f"Source: {', '.join(Path(s).name for s in sources)} ({len(records)} records). "
        f"Times: ms per call, the median over timed rounds (GPU time between CUDA events); compile modes: "
        f"{'; '.join(modes) or '—'}.",
        "",
        "## Targets",
        "",
        *_summary(evaluate(groups)),
        "",
        "Speedups are the baseline's median time over ours. \"of copy BW\": the bytes a layer must move (input "
        "read once, output written once, weights) over its median time, as a fraction of the copy bandwidth. "
        "\"wrong\": the output failed its check against the float64 reference and was not timed; \"error\": the "
        "provider failed to build or run (the record holds the message). float32 runs without TF32.",
    ]
    titles = {("layer", "dwconv_bn_act"): "Layers: depthwise conv + BN + activation",
              ("layer", "squeeze_excite"): "Layers: squeeze-excite", ("model", None): "Models"}
    for key, cases in groups.items():
        lines += ["", f"## {titles.get(key, ' '.join(str(k) for k in key))}", "", *_table(*key, cases)]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- plots
def plot(records: list, out_dir: Path, stem: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    layers = [r for r in records if r["family"] == "layer" and _ok(r)]
    ours = sorted({r["provider"] for r in layers if r["provider"] not in BASELINES})
    if layers:
        fig, ax = plt.subplots(figsize=(9, 5))
        for provider in _ordered({r["provider"] for r in layers}):
            for op, marker in (("dwconv_bn_act", "o"), ("squeeze_excite", "^")):
                points = [r for r in layers if r["provider"] == provider and r["op"] == op]
                if points:
                    ax.scatter([r["bytes"] / 2**20 for r in points], [r["frac_of_copy_bw"] for r in points],
                               marker=marker, label=f"{provider} {op}", alpha=0.7, color=_color(provider))
        ax.axhline(0.85, color="gray", linestyle="--", linewidth=1)
        ax.axvline(BANDWIDTH_TARGET_MIN_BYTES / 2**20, color="gray", linestyle=":", linewidth=1)
        ax.set(xscale="log", xlabel="bytes moved (MiB)", ylabel="fraction of copy bandwidth",
               title="Layers: achieved bandwidth (dashed: dwconv target 85%, dotted: 16 MiB)")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / f"{stem}-layers-bandwidth.png"))

        fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
        for row, op in enumerate(("dwconv_bn_act", "squeeze_excite")):
            for col, baseline in enumerate(("eager", "compile")):
                ax = axes[row][col]
                groups = group_cases([r for r in layers if r["op"] == op])
                for provider in ours:
                    xs, ys = [], []
                    for per_case in groups.get(("layer", op), {}).values():
                        if _ok(per_case.get(provider)) and _ok(per_case.get(baseline)):
                            xs.append(per_case[provider]["bytes"] / 2**20)
                            ys.append(per_case[baseline]["median_ms"] / per_case[provider]["median_ms"])
                    if xs:
                        ax.scatter(xs, ys, label=provider, alpha=0.7, color=_color(provider))
                for target in TARGETS:
                    if target.op == op and target.baseline == baseline:
                        ax.axhline(target.threshold, color="gray", linestyle="--", linewidth=1)
                ax.set(xscale="log", xlabel="bytes moved (MiB)", ylabel=f"speedup over {baseline}", title=op)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
        fig.suptitle("Layers: speedup (dashed: target)")
        written.append(_save(fig, out_dir / f"{stem}-layers-speedup.png"))

    models = [r for r in records if r["family"] == "model" and _ok(r)]
    if models:
        cases = list(dict.fromkeys(r["case"] for r in models))
        providers = _ordered({r["provider"] for r in models})
        by_key = {(r["case"], r["provider"]): r["images_per_s"] for r in models}
        fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(cases)), 5))
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            ax.bar([c + i * width for c in range(len(cases))],
                   [by_key.get((case, provider), 0) for case in cases], width, label=provider,
                   color=_color(provider))
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
        ax.set_xticklabels([c.replace(", ", "\n") for c in cases], fontsize=7)
        ax.set(yscale="log", ylabel="images / s", title="Models: throughput")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / f"{stem}-models.png"))
    return written


def _color(provider: str) -> str:
    """One color per provider across all plots."""
    order = PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER)
    return f"C{order % 10}"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ main
def floor_table(records: list, static_records: list) -> str:
    """Measured layer times beside the static report's floor (the bytes the layer must move at copy bandwidth):
    how far each provider is from the memory-bandwidth floor."""
    floors = {r["case"]: r["floor_us"] for r in static_records if r.get("floor_us")}
    layers = {case: per_provider for (family, _), cases in group_cases(records).items() if family == "layer"
              for case, per_provider in cases.items() if case in floors}
    providers = _ordered({p for per_provider in layers.values() for p in per_provider})
    lines = ["## Layers against the memory floor (median us, x floor)", "",
             "| case | floor us | " + " | ".join(providers) + " |", "|" + "---|" * (len(providers) + 2)]
    for case, per_provider in layers.items():
        cells = []
        for p in providers:
            r = per_provider.get(p)
            cells.append(f"{r['median_ms'] * 1e3:.1f} ({r['median_ms'] * 1e3 / floors[case]:.1f}x)" if _ok(r)
                         else _ms_cell(r))
        lines.append(f"| {case} | {floors[case]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", type=Path, help="results files (default: the newest)")
    parser.add_argument("--out", type=Path, help="output folder (default: beside the results file)")
    parser.add_argument("--static", type=Path, help="python -m benchmarks.static --output FILE: each layer's "
                        "memory floor beside its measured times")
    args = parser.parse_args(argv)
    try:
        sources = args.results or [newest_results(results_dir())]
    except FileNotFoundError as missing:
        print(missing, file=sys.stderr)
        return 1
    records = load_records(sources)
    if not records:
        print(f"{', '.join(map(str, sources))}: no records", file=sys.stderr)
        return 1
    out_dir = args.out or sources[-1].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = sources[-1].stem
    plots = plot(records, out_dir, stem)
    report = out_dir / f"{stem}.md"
    markdown = render_markdown(records, sources, plots)
    if args.static:
        markdown += "\n" + floor_table(records, json.loads(args.static.read_text())) + "\n"
    report.write_text(markdown)
    print(f"wrote {report} and {len(plots)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
