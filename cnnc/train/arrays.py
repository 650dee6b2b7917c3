"""Reading .npz archives that may be hostile.

Each array's header is checked against the bytes the archive really holds
before anything is allocated: a header that declares a petabyte is a
one-line error, not a MemoryError (or a machine swapping itself to death).
"""
from __future__ import annotations

import zipfile
import zlib
from math import prod
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

NPY_MAGIC = b"\x93NUMPY"

# deflate cannot expand data more than about 1032-fold: a member that declares
# more than that compared with what it stores is lying
_DEFLATE_RATIO = 1032

_HEADER_READERS = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}


class ArchiveError(ValueError):
    """Why a file is not a usable .npz archive, in words; callers add the file's name."""


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz archive by name, each checked before it is allocated."""
    try:
        with open(path, "rb") as f:
            if f.read(len(NPY_MAGIC)) == NPY_MAGIC:
                raise ArchiveError("a single .npy array, not an .npz archive of named arrays")
        file_size = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            return {info.filename[:-len(".npy")]: _read_member(zf, info, file_size)
                    for info in zf.infolist() if info.filename.endswith(".npy")}
    except ArchiveError:
        raise
    except zipfile.BadZipFile:
        raise ArchiveError("not an .npz archive (not a zip file)") from None
    except MemoryError:
        raise ArchiveError("not enough memory to load its arrays") from None
    except (OSError, ValueError, EOFError, RuntimeError, NotImplementedError, zlib.error) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArchiveError(f"cannot read it as .npz ({first})") from None


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, file_size: int) -> np.ndarray:
    name = info.filename[:-len(".npy")]
    if info.compress_size > file_size:
        raise ArchiveError(f"array '{name}' claims {info.compress_size} bytes, more than the file's {file_size}")
    if info.compress_type == zipfile.ZIP_STORED:
        most = info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        most = info.compress_size * _DEFLATE_RATIO + 64
    else:
        raise ArchiveError(f"array '{name}' is compressed with method {info.compress_type}; "
                           f"numpy writes stored or deflated members only")
    if info.file_size > most:
        raise ArchiveError(f"array '{name}' declares {info.file_size} bytes, more than its "
                           f"{info.compress_size} stored bytes can hold")
    with zf.open(info) as member:
        version = npy.read_magic(member)
        if version not in _HEADER_READERS:
            raise ArchiveError(f"array '{name}' has .npy format version {version[0]}.{version[1]}, "
                               f"which cnnc does not read")
        shape, _, dtype = _HEADER_READERS[version](member)
        data_bytes = info.file_size - member.tell()
    if dtype.hasobject:
        raise ArchiveError(f"array '{name}' holds Python objects, not numbers")
    declared = prod(shape) * dtype.itemsize
    if declared != data_bytes:
        raise ArchiveError(f"array '{name}' declares shape {tuple(shape)} of {dtype} ({declared} bytes) "
                           f"but holds {data_bytes} bytes")
    with zf.open(info) as member:
        return npy.read_array(member, allow_pickle=False)
