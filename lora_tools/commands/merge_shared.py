"""What merge and unmerge share on the command line: library arguments and the summary."""

from __future__ import annotations

from typing import Any

from lora_tools.commands.common import parse_enable_lora, progress_wanted


def library_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """Options shared by merge and unmerge, turned into library arguments."""
    from lora_tools.adapters.options import AdapterOptions
    from lora_tools.io import parse_size
    from lora_tools.io.dtypes import parse_dtype

    return {
        "opts": AdapterOptions(opts["alpha"], parse_enable_lora(opts["enable_lora"]),
                               opts["fan_in_fan_out"]),
        "dtype": parse_dtype(opts["dtype"]) if opts["dtype"] else None,
        "device": opts["device"],
        "shard_size": parse_size(opts["shard_size"]) if opts["shard_size"] else None,
        "force": opts["force"],
        "allow_unmatched": opts["allow_unmatched"],
        "resize_vocab": opts.get("resize_vocab", False),
        "untie": opts.get("untie", False),
        "dequantize": opts.get("dequantize", False),
        "progress": progress_wanted(opts["quiet"], opts["as_json"]),
        "max_memory": parse_size(opts["max_memory"]) if opts.get("max_memory") else None,
        "overlap": opts.get("overlap", True),
        "component": opts.get("component"),
        "block_weights": opts.get("block_weights"),
    }


def describe_merge(d: dict[str, Any]) -> str:
    lines = []
    for a in d["adapters"]:
        scales = ", ".join(f"{s:g}" for s in a["scales"])
        lines.append(f"{a['op']}d {a['adapter']} ({a['format']}, weight {a['weight']:g}, "
                     f"scale {scales}): {a['merged_modules']} of {a['modules']} modules")
        if a.get("block_weights"):
            table = a["block_weights"]
            lines.append("  block weights: " + ", ".join(
                f"{k} ×{w:g}" for k, w in sorted(table.items())))
    lines.append(f"wrote {d['out']}: {d['tensors']} tensors ({d['changed']} changed, "
                 f"{d['copied']} copied byte for byte), {d['bytes_written'] / 1e6:.1f} MB "
                 f"in {d['seconds']:.2f}s on {d['device']}")
    return "\n".join(lines)
