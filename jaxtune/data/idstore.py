"""Token ids of many files as one flat read-only array, memory-mapped, with no open descriptor.

A start over thousands of cached files needs every file's ids in one address space (rows are
built by slicing one array), but neither a copy of them (RAM) nor one open descriptor per file
(Python's `mmap` keeps a duplicate of the descriptor for the mapping's lifetime; numpy's memmap
too). `flat_ids` reserves one range of virtual memory and maps each file into its own
page-aligned slot inside it (POSIX keeps a mapping after its descriptor is closed), so:
  - the ids cost page cache, not process memory, and the kernel can drop clean pages;
  - one descriptor is open at a time, only while a file is being mapped;
  - segment k's ids start at index `bases[k]` of the array (slots are page-aligned, so there
    are unmapped gaps between them that no index ever reaches).
In-memory segments are copied into their slot. Where the C library cannot be reached (not
Linux / macOS), the segments are read and concatenated instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import mmap
import os
import threading
from typing import Sequence, Union

import numpy as np

PAGE = mmap.PAGESIZE
_PROT_NONE, _PROT_READ, _PROT_WRITE = 0, 1, 2
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED = 0x01, 0x02, 0x10
_MAP_ANONYMOUS = 0x20 if os.uname().sysname == "Linux" else 0x1000
_MAP_NORESERVE = 0x4000 if os.uname().sysname == "Linux" else 0
_MAP_FAILED = ctypes.c_void_p(-1).value
MAX_SEGMENTS = 30000   # mappings per process are limited (vm.max_map_count, 65530 by default)


@dataclasses.dataclass(frozen=True)
class FileIds:
  """`count` uint32 ids stored raw at byte `offset` (page-aligned) of the file at `path`."""
  path: str
  count: int
  offset: int = 0

  def read(self) -> np.ndarray:
    return np.fromfile(self.path, np.uint32, count=self.count, offset=self.offset)


Segment = Union[FileIds, np.ndarray]
_LIBC = None
_LIBC_LOCK = threading.Lock()


def _libc():
  global _LIBC  # pylint: disable=global-statement
  with _LIBC_LOCK:
    if _LIBC is None:
      try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int, ctypes.c_long)
        lib.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        lib.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _LIBC = lib
      except (OSError, AttributeError):
        _LIBC = False
    return _LIBC


class _Region:
  """Owns the mapped range; numpy arrays over it keep it alive through their `.base`."""

  def __init__(self, lib, addr: int, size: int, count: int):
    self._lib, self.addr, self.size = lib, addr, size
    self.__array_interface__ = dict(shape=(count,), typestr="<u4", data=(addr, True),
                                    version=3)

  def __del__(self):
    if self.addr:
      self._lib.munmap(self.addr, self.size)
      self.addr = 0


def _slot(count: int) -> int:
  return -(-count * 4 // PAGE) * PAGE


def flat_ids(segments: Sequence[Segment]) -> tuple[np.ndarray, np.ndarray]:
  """(one read-only uint32 array over every segment, each segment's first index in it)."""
  segments = list(segments)
  counts = [s.count if isinstance(s, FileIds) else len(s) for s in segments]
  if len(segments) == 1 and isinstance(segments[0], np.ndarray):
    return segments[0], np.zeros(1, np.int64)
  lib = _libc()
  if not lib or len(segments) > MAX_SEGMENTS or not segments:
    return _concatenated(segments, counts)
  slots = [_slot(c) for c in counts]
  total = sum(slots)
  if total == 0:
    return np.zeros(0, np.uint32), np.zeros(len(segments), np.int64)
  addr = lib.mmap(None, total, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE,
                  -1, 0)
  if addr in (None, _MAP_FAILED):
    return _concatenated(segments, counts)
  region = _Region(lib, addr, total, total // 4)   # unmapped on any failure below
  at = 0
  for seg, count, slot in zip(segments, counts, slots):
    if count:
      _place(lib, addr + at, seg, count, slot)
    at += slot
  bases = np.concatenate([[0], np.cumsum(slots)[:-1]]).astype(np.int64) // 4
  return np.asarray(region), bases


def _place(lib, where: int, seg: Segment, count: int, slot: int) -> None:
  if isinstance(seg, FileIds):
    fd = os.open(seg.path, os.O_RDONLY)
    try:
      if os.fstat(fd).st_size < seg.offset + count * 4:
        raise OSError(f"{seg.path} holds fewer than {count} ids")
      got = lib.mmap(where, count * 4, _PROT_READ, _MAP_SHARED | _MAP_FIXED, fd, seg.offset)
    finally:
      os.close(fd)
    if got != where:
      raise OSError(ctypes.get_errno(), f"cannot map {seg.path}")
    return
  got = lib.mmap(where, slot, _PROT_READ | _PROT_WRITE,
                 _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
  if got != where:
    raise OSError(ctypes.get_errno(), "cannot map anonymous memory")
  src = np.ascontiguousarray(seg, np.uint32)
  ctypes.memmove(where, src.ctypes.data, count * 4)
  lib.mprotect(where, slot, _PROT_READ)


def _concatenated(segments, counts) -> tuple[np.ndarray, np.ndarray]:
  arrays = [s.read() if isinstance(s, FileIds) else np.asarray(s, np.uint32) for s in segments]
  bases = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if counts else \
      np.zeros(0, np.int64)
  return (np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)), bases


# ---------------------------------------------------------------- crash leftovers in TMPDIR
STALE_PATTERNS = (("jaxtune-tokens-", ".u32"), ("jaxtune-encoder-", ".pkl"))
STALE_GRACE_SECONDS = 60.0   # younger files may belong to a start that has not opened them yet


def _open_files() -> set[tuple[int, int]] | None:
  """(device, inode) of every file some process we may inspect holds open; None where /proc
  cannot tell."""
  if not os.path.isdir("/proc/self/fd"):
    return None
  held = set()
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
      continue
    for fd in fds:
      try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
      except OSError:
        continue
      held.add((st.st_dev, st.st_ino))
  return held


def clean_stale_stores(tmpdir: str | None = None,
                       grace: float = STALE_GRACE_SECONDS) -> list[str]:
  """Deletes token stores and encoder files a crashed start left in TMPDIR: ours (this user's),
  older than `grace` seconds and open in no process. A live start's store is either open (a
  writer or the mapping holds it) or already unlinked. Returns the paths removed."""
  import tempfile  # pylint: disable=import-outside-toplevel
  tmpdir = tmpdir or tempfile.gettempdir()
  try:
    names = os.listdir(tmpdir)
  except OSError:
    return []
  now, uid = __import__("time").time(), os.getuid()
  candidates = []
  for name in names:
    if not any(name.startswith(p) and name.endswith(s) for p, s in STALE_PATTERNS):
      continue
    path = os.path.join(tmpdir, name)
    try:
      st = os.lstat(path)
    except OSError:
      continue
    if st.st_uid == uid and now - st.st_mtime > grace:
      candidates.append((path, (st.st_dev, st.st_ino)))
  if not candidates:
    return []
  held = _open_files()
  if held is None:
    return []
  removed = []
  for path, key in candidates:
    if key not in held:
      try:
        os.unlink(path)
        removed.append(path)
      except OSError:
        pass
  return removed
