"""Terminal text of ``inspect`` reports: aligned, at most 100 columns wide."""

from __future__ import annotations

import textwrap
from typing import Any

WIDTH = 100
_NOISE = ("base_model.model.", "model.")


def render(d: dict[str, Any]) -> str:
    return "\n".join(adapter_lines(d) if d["mode"] == "adapter" else checkpoint_lines(d))


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def num(x: float | None, fmt: str = ".3g") -> str:
    return "?" if x is None else format(x, fmt)


def short(name: str, width: int) -> str:
    """A module name without the usual wrapper prefixes, cut from the left to ``width``."""
    for noise in _NOISE:
        name = name.removeprefix(noise)
    return clip(name, width)


def clip(text: str, width: int = WIDTH - 11) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def field(label: str, text: str) -> str:
    return f"{label:<11}{text}"


def adapter_lines(d: dict[str, Any]) -> list[str]:
    s = d["summary"]
    files = len(d["files"])
    lines = [field("adapter", clip(d["path"])),
             field("format", f"{d['format']} · {files} file{'s' * (files > 1)} · "
                             f"{size(d['size_bytes'])} · {', '.join(d['dtypes'])}")]
    params = f"{d['params']:,} params"
    if d["base"] and d["base"]["fraction_added"] is not None:
        b = d["base"]
        params += (f" = {100 * b['fraction_added']:.3g}% of the base's {b['params']:,} "
                   f"({b['matched_modules']} modules matched)")
    lines.append(field("modules", f"{s['modules']} · rank {_ranks(s['ranks'])} · {params}"))
    lines.append(field("groups", " · ".join(f"{g} {n}" for g, n in s["groups"].items())))
    dora = f"yes ({d['dora_magnitudes']} magnitude vectors)" if d["dora_magnitudes"] else "no"
    lines.append(field("flags", f"rsLoRA {_rslora(s)} · DoRA {dora}"))
    lines += ["", *alpha_lines(s["alphas"]), "", *module_lines(d), "", *layer_lines(d)]
    lines += ["", field("health", _health(s["health"]))]
    notes = list(d["notes"]) + [
        f"whole tensor {w['replaces']} ({'×'.join(map(str, w['shape']))}) saved beside the "
        "factors: merge puts it in place of the base's" for w in d["whole_tensors"]]
    for n in notes:
        lines += [field("note" if i == 0 else "", part)
                  for i, part in enumerate(textwrap.wrap(n, WIDTH - 11))]
    if d.get("plot"):
        lines.append(field("plot", clip(d["plot"])))
    lines.append(field("took", f"{d['seconds']:.2f}s on {d['device']}"))
    return lines


def _ranks(ranks: list[int]) -> str:
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]} (mixed)"


def _rslora(s: dict[str, Any]) -> str:
    n, total = s["rslora_modules"], s["modules"]
    return "yes" if n == total else ("no" if n == 0 else f"{n} of {total} modules")


def alpha_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = [f"{'scale':<11}{'modules':>7} {'rank':>5} {'alpha':>9} {'scale':>9}  alpha from"]
    for r in rows:
        scale = "unknown" if r["scale"] is None else f"{r['scale']:.4g}"
        alpha = "?" if r["alpha"] is None else f"{r['alpha']:g}"
        how = r["source"] + (" · rsLoRA α/√r" if r["rslora"] else "")
        out.append(f"{'':<11}{r['modules']:>7} {r['rank']:>5} {alpha:>9} {scale:>9}  {how}")
    return out


_COLS = "{:<2}{:<27} {:<9} {:>4} {:>8} {:>9} {:>9} {:>6} {:>4} {:>4} {:>9}"


def module_lines(d: dict[str, Any]) -> list[str]:
    s, top = d["summary"], d["top"]
    known = s["ranked_by"] == "norm_delta"
    head = ("‖ΔW‖_F", "σ₁") if known else ("‖B·A‖_F", "σ₁(B·A)")
    out = [_COLS.format("", "module", "group", "r", "scale", *head, "srank", "r90", "r99",
                        "‖ΔW‖/‖W‖")]
    by_name = {m["name"]: m for m in d["modules"]}
    strong, weak = s["strongest"], s["weakest"]
    ranked_all = len(by_name) <= 2 * top
    if ranked_all:
        names = sorted(by_name, key=lambda n: -(_strength(by_name[n], known) or 0.0))
        out.append(f"all {len(names)} modules, strongest first (by {head[0]})")
        out += [_row(by_name[n], known) for n in names]
        return out
    out.append(f"strongest {len(strong)} (by {head[0]})")
    out += [_row(by_name[n], known) for n in strong]
    out.append(f"weakest {len(weak)}")
    out += [_row(by_name[n], known) for n in weak]
    return out


def _strength(m: dict[str, Any], known: bool) -> float | None:
    v: float | None = m["norm_delta"] if known else m["norm_ba"]
    return v


def _row(m: dict[str, Any], known: bool) -> str:
    flag = "!" if m["nan"] or m["inf"] or m["zero_a"] or m["zero_b"] else ""
    sigma = m["spectral_norm"] if known else (m["singular_values_ba"] or [None])[0]
    rel = "-" if m["rel_update"] is None and m["norm_base"] is None else num(m["rel_update"])
    return _COLS.format(flag, short(m["name"], 27), m["group"], m["rank"], num(m["scale"], ".4g"),
                        num(_strength(m, known)), num(sigma), num(m["stable_rank"]),
                        num(m["eff_rank_90"], "d"), num(m["eff_rank_99"], "d"), rel)


def layer_lines(d: dict[str, Any]) -> list[str]:
    """Per-layer update norms, as many ``name value`` cells per line as fit in 100 columns."""
    known = d["summary"]["ranked_by"] == "norm_delta"
    key = "norm_delta" if known else "norm_ba"
    cells = [f"{short(r['layer'] or '(none)', 24)} {num(r[key])}" for r in d["summary"]["layers"]]
    label = "‖ΔW‖_F by layer" if known else "‖B·A‖_F by layer (alpha unknown)"
    cell_w = max((len(c) for c in cells), default=0) + 3
    per_line = max(1, (WIDTH - 2) // cell_w)
    out = [label]
    for i in range(0, len(cells), per_line):
        out.append("  " + "".join(c.ljust(cell_w) for c in cells[i:i + per_line]).rstrip())
    return out


def _health(h: dict[str, int]) -> str:
    problems = [
        f"{h['nan_values']} NaN in {plural(h['nan_modules'], 'module')}" if h["nan_modules"] else "",
        f"{h['inf_values']} Inf in {plural(h['inf_modules'], 'module')}" if h["inf_modules"] else "",
        f"all-zero B in {plural(h['zero_b_modules'], 'module')}" if h["zero_b_modules"] else "",
        f"all-zero A in {plural(h['zero_a_modules'], 'module')}" if h["zero_a_modules"] else ""]
    problems = [p for p in problems if p]
    return "ok: no NaN/Inf, no all-zero factors" if not problems else "! " + " · ".join(problems)


def checkpoint_lines(d: dict[str, Any]) -> list[str]:
    lines = [field("checkpoint", clip(d["path"])),
             field("size", f"{size(d['size_bytes'])} in {plural(d['shards'], 'file')}"),
             field("tensors", f"{d['tensors']:,} · {d['params']:,} params")]
    gguf = bool(d.get("architecture"))
    if gguf:
        lines.append(field("arch", f"{d['architecture']} (GGUF)"))
    lines.append(field("types" if gguf else "dtypes",
                       " · ".join(f"{k} {plural(v['tensors'], 'tensor')} {size(v['bytes'])}"
                                  for k, v in d["dtypes"].items())))
    if d["shards"] > 1:
        lines += [field("shards" if i == 0 else "", f"{f['name']}  {size(f['bytes'])}")
                  for i, f in enumerate(d["files"])]
    lines.append(f"largest {plural(len(d['largest']), 'tensor')}")
    for t in d["largest"]:
        shape = "×".join(map(str, t["shape"])) or "scalar"
        lines.append(f"  {clip(t['name'], 56):<56} {shape:>18} {t['dtype']:>9} "
                     f"{size(t['bytes']):>10}")
    return lines + provenance_lines(d)


def provenance_lines(d: dict[str, Any]) -> list[str]:
    records = d["provenance"]
    if not records:
        return [field("provenance", "none: no lora-tools merge is recorded in the metadata")]
    out = [f"provenance {plural(len(records), 'record')}, oldest first"]
    for r in records:
        scales = ", ".join(f"{float(x):g}" for x in r.get("scales", []))
        out.append(f"  {r.get('op', '?'):<8} {short(str(r.get('adapter', '?')), 30):<30} "
                   f"sha256 {str(r.get('sha256', ''))[:12]}  weight {r.get('weight', '?')}  "
                   f"scale {scales}")
    now = ", ".join(f"{m['adapter']} ×{m['times']}" for m in d["merged_now"]) or "nothing"
    out.append(field("merged now", now))
    return out
