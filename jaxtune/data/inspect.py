"""A packed row and the data's statistics as text: what `python -m jaxtune.data` prints and
what a notebook shows, with no command-line flags attached."""

from __future__ import annotations

import re

from jaxtune.data.templates import IMG_CONTEXT


def _squeeze_images(text: str) -> str:
  """A run of <IMG_CONTEXT> tokens as one <IMG_CONTEXT>×N."""
  return re.sub(f"(?:{re.escape(IMG_CONTEXT)}){{2,}}",
                lambda m: f"{IMG_CONTEXT}×{len(m.group(0)) // len(IMG_CONTEXT)}", text)


def render_row(batch: dict, row: int, decode) -> str:
  """Row `row` of a batch as text: ⟦predicted⟧ tokens, ┃ between samples, padding counted."""
  ids, labels = batch["input_ids"][row], batch["labels"][row]
  tile_seg = batch["tile_segment_ids"][row] if "tile_segment_ids" in batch else None
  seg = batch["segment_ids"][row]
  out = []
  for s in range(1, int(seg.max()) + 1):
    at = [int(i) for i in (seg == s).nonzero()[0]]
    # Token t is predicted when the label of t-1 (its target) is not -100.
    target = [False] + [labels[i] != -100 for i in at[:-1]]
    runs, start = [], 0
    for k in range(1, len(at) + 1):
      if k == len(at) or target[k] != target[start]:
        text = _squeeze_images(decode([ids[i] for i in at[start:k]]))
        runs.append(f"⟦{text}⟧" if target[start] else text)
        start = k
    slots = [] if tile_seg is None else [int(i) for i in (tile_seg == s).nonzero()[0]]
    tiles = f", image tiles {slots[0]}..{slots[-1]} ({len(slots)})" if slots else ""
    out.append(f"┃ sample {s}: {len(at)} tokens, {sum(target)} with loss, positions "
               f"{batch['positions'][row][at[0]]}..{batch['positions'][row][at[-1]]}{tiles}\n"
               + "".join(runs))
  pad = int((seg == 0).sum())
  out.append(f"┃ padding: {pad} tokens" + (
      "" if tile_seg is None else
      f"; tile slots used {int((tile_seg > 0).sum())} of {len(tile_seg)}"))
  return "\n".join(out)


def format_stats(stats: dict) -> str:
  """SFTData.stats as a table per dataset, then packing, steps and images."""
  cols = ("samples", "tokens", "loss_tokens", "truncated", "dropped_image_cut", "bad",
          "image_samples")
  if stats.get("image_samples"):
    cols += ("image_tiles", "dropped_tile_bound")
  width = {c: max(18, len(c) + 2) for c in cols}
  lines = [f"{'dataset':<24}" + "".join(f"{c:>{width[c]}}" for c in cols)]
  for name, d in stats["datasets"].items():
    lines.append(f"{name:<24}" + "".join(f"{d[c]:>{width[c]},}" for c in cols))
    for loc in d["bad_locations"]:
      lines.append(f"    bad: {loc}")
  lines.append(
      f"\npack_level={stats['pack_level']} pack_max_length={stats['pack_max_length']}: "
      f"{stats['packs']:,} packs, efficiency {stats['pack_efficiency']:.4f}\n"
      f"global_batch_size={stats['rows_per_step']}: {stats['steps_per_epoch']:,} optimizer "
      f"steps per epoch " + (
          f"(round_up: ceil(packs / batch); the last batch topped up with "
          f"{stats['packs_repeated_per_epoch']} pack(s) from the start of the epoch's order)"
          if stats["round_up"] else
          f"({stats['packs_dropped_per_epoch']} pack(s) of the last incomplete batch left out "
          "each epoch)") +
      (f"\ngroup_by_length: groups of {stats['group_rows']} packs of similar attention cost "
       "per micro-batch" if stats["group_by_length"] else ""))
  if stats.get("image_samples"):
    lines.append(
        f"images: {stats['image_samples']:,} image samples, {stats['image_tiles']:,} tiles of "
        f"{stats['image_size']}x{stats['image_size']} in {stats['packs_with_images']:,} "
        f"pack(s); max_tiles_per_pack={stats['max_tiles_per_pack']}: tiles per pack max "
        f"{stats['tiles_per_pack_max']}, mean {stats['tiles_per_pack_mean']:.2f} (tile slots "
        f"used {stats['tile_slot_use']:.3f}); {stats['packs_closed_by_tile_limit']:,} pack(s) "
        f"closed early by the tile limit; {stats['dropped_tile_bound']:,} sample(s) dropped "
        "for having more tiles than a pack holds")
  return "\n".join(lines)
