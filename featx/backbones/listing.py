"""The table of backbones (``featx backbones``): each network's default layer, its width, and its published
weights with the ImageNet accuracy their metadata reports; and one network's layers and graph nodes."""
from __future__ import annotations

from featx.backbones.graph import VIRTUAL, graph_info, reduced_width, reduction_for
from featx.backbones.registry import BACKBONES, get_spec


def backbone_rows(names: list[str] | None = None) -> list[dict]:
    """One row per backbone (all of them by default), read off torchvision's weights metadata and the network's
    graph on the meta device (nothing is downloaded or computed)."""
    rows = []
    for name in names or sorted(BACKBONES):
        spec = get_spec(name)
        w = spec.weights_enum()
        t = w.transforms()
        metrics = w.meta.get("_metrics", {}).get("ImageNet-1K", {})
        rows.append({"name": name, "default_layer": spec.default_layer, "dim": int(spec.dims[spec.default_layer]),
                     "penultimate": int(spec.dims["penultimate"]),
                     "named_layers": list(spec.named), "weights": spec.weights,
                     "acc1": metrics.get("acc@1"), "acc5": metrics.get("acc@5"),
                     "params": w.meta.get("num_params"), "resize": int(t.resize_size[0]), "crop": int(t.crop_size[0]),
                     "interpolation": t.interpolation.value})
    return rows


def format_rows(rows: list[dict], *, markdown: bool = False) -> str:
    """The rows as an aligned text table, or as a Markdown table (``markdown``)."""
    head = ["backbone", "default layer", "width", "penultimate", "named layers", "weights", "ImageNet top-1", "top-5",
            "params", "input"]
    body = [[r["name"], r["default_layer"], str(r["dim"]), str(r["penultimate"]), ", ".join(r["named_layers"]) or "-",
             r["weights"],
             f"{r['acc1']:.3f}" if r["acc1"] is not None else "-", f"{r['acc5']:.3f}" if r["acc5"] is not None else "-",
             f"{r['params'] / 1e6:.1f}M" if r["params"] else "-",
             f"{r['resize']}/{r['crop']} {r['interpolation']}"] for r in rows]
    return _table(head, body, markdown=markdown)


def layer_rows(name: str, *, nodes: bool = False) -> list[dict]:
    """The layers of backbone ``name``: its named layers, ``penultimate`` and ``logits`` (and, with ``nodes``, every
    node of its eval-mode graph) with the node each is read at, its shape, reduction and width."""
    spec = get_spec(name)
    info = graph_info(spec)
    out = []
    for layer in list(spec.named) + [v for v in VIRTUAL if v not in spec.named]:
        tap = info.tap(layer)
        out.append({"layer": layer, "node": tap.node, "shape": list(tap.shape), "reduce": tap.reduce, "dim": tap.dim})
    if nodes:
        info.shapes(info.nodes)
        for node in info.nodes:
            got = info.output_of(node)
            if isinstance(got, tuple) and len(got) >= 1 and got[0] == 2:
                shape = got[1:]
                rule = reduction_for(spec.family, shape)
                out.append({"layer": node, "node": node, "shape": list(shape), "reduce": rule,
                            "dim": reduced_width(shape, rule)})
            else:
                out.append({"layer": node, "node": node, "shape": None, "reduce": None, "dim": None,
                            "note": f"not a row per image ({got})"})
    return out


def format_layers(rows: list[dict], *, markdown: bool = False) -> str:
    head = ["layer", "node", "shape", "reduce", "width"]
    body = [[r["layer"], r["node"], "x".join(map(str, r["shape"])) if r["shape"] is not None else "-",
             r["reduce"] or r.get("note", "-"), str(r["dim"]) if r["dim"] is not None else "-"] for r in rows]
    return _table(head, body, markdown=markdown)


def _table(head: list[str], body: list[list[str]], *, markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines) + "\n"
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head, *body]) + "\n"
