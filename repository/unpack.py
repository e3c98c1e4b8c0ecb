"""Turns an upload's body (already on disk) into the files of one model version.

Two body formats:

* a tar archive, gzip-compressed or not (told apart by the gzip magic bytes, not by
  the declared type), read as a stream; its members are the version's files, paths
  relative to the version;
* ``multipart/form-data`` whose parts are all named ``files``, each part's filename
  being its relative path (``/`` makes subdirectories); parsed as a stream too.

Every member's path is checked (``repository.paths``) and refused with a 400
``bad_path`` that names it: absolute, ``..``, backslash, NUL, empty, duplicate, a file
where a directory is (or the reverse), and in a tar anything that is not a regular
file or a directory (symlinks, hard links, devices, fifos). Files are created with
``O_EXCL`` under a fresh directory that only this code writes, with default modes
(a tar's modes and owners are ignored). Limits: ``max_files`` members and
``max_bytes`` unpacked bytes (413 ``too_large``, checked against a tar member's
declared size before it is written, and against the bytes actually written).
A body that is not a valid archive or form is a 400 ``bad_archive``.

Each file is hashed while it is written; ``Unpacked`` holds every file's size and
SHA-256 and every directory, so validation never walks the disk.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

try:
    from python_multipart.exceptions import FormParserError, MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # python-multipart < 0.0.13 names its package "multipart"
    from multipart.exceptions import FormParserError, MultipartParseError  # type: ignore[no-redef]
    from multipart.multipart import MultipartParser, parse_options_header  # type: ignore[no-redef]

from sluice.paths import UnsafePath, relative_parts
from repository.staging import storage_error
from sluice.errors import ApiError

_CHUNK = 1 << 20
#: tar bytes a member may take besides its data: header, long-name/PAX blocks, padding
_TAR_OVERHEAD_PER_MEMBER = 4096
_MAX_PART_HEADERS = 16 << 10
#: tar members that tarfile reads into memory whole (PAX headers, GNU long names): refused above this size
_MAX_META_BYTES = 1 << 20
_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


def bad_path(path: str, reason: str) -> ApiError:
    return ApiError(400, f"upload member {path!r} {reason}", "bad_path", member=path)


def bad_archive(message: str) -> ApiError:
    return ApiError(400, message, "bad_archive")


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


@dataclass
class Unpacked:
    """What an upload unpacked into ``root``: files (relative POSIX path -> size and digest) and directories."""

    root: Path
    files: dict[str, FileRecord] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)

    def has(self, path: str) -> bool:
        return path in self.files or path in self.dirs


class _Writer:
    """Creates the members of one upload under ``root``, enforcing path rules and limits."""

    def __init__(self, root: Path, max_files: int, max_bytes: int):
        self.out = Unpacked(root)
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.members = 0
        self.written = 0
        self._explicit_dirs: set[str] = set()

    def _member(self, name: str, *, allow_empty: bool = False) -> tuple[str, ...]:
        try:
            parts = relative_parts(name, allow_empty=allow_empty)
        except UnsafePath as exc:
            raise bad_path(name, exc.reason) from None
        self.members += 1
        if self.members > self.max_files:
            raise ApiError(413, f"the upload has more than {self.max_files} files", "too_large", limit=self.max_files)
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in self.out.files:
                raise bad_path(name, f"is inside {'/'.join(parts[:i])!r}, which is a file")
        return parts

    def _mkdirs(self, parts: tuple[str, ...], name: str) -> None:
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path not in self.out.dirs:
                try:
                    (self.out.root / path).mkdir()
                except OSError as exc:
                    raise self._os_error(exc, name) from exc
                self.out.dirs.add(path)

    def directory(self, name: str) -> None:
        parts = self._member(name, allow_empty=True)
        if not parts:
            return  # the version directory itself (a tar's "./")
        path = "/".join(parts)
        if path in self.out.files:
            raise bad_path(name, "is both a file and a directory")
        if path in self._explicit_dirs:
            raise bad_path(name, "is a duplicate")
        self._explicit_dirs.add(path)
        self._mkdirs(parts, name)

    def file(self, name: str, declared_size: int | None = None) -> _Sink:
        parts = self._member(name)
        path = "/".join(parts)
        if path in self.out.files:
            raise bad_path(name, "is a duplicate")
        if path in self.out.dirs:
            raise bad_path(name, "is both a file and a directory")
        if declared_size is not None and self.written + declared_size > self.max_bytes:
            raise self._too_large()
        self._mkdirs(parts[:-1], name)
        try:
            handle = open(self.out.root / path, "xb")
        except OSError as exc:
            raise self._os_error(exc, name) from exc
        return _Sink(self, name, path, handle)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the upload unpacks to more than {self.max_bytes} bytes", "too_large", limit=self.max_bytes)

    @staticmethod
    def _os_error(exc: OSError, name: str) -> ApiError:
        if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            return bad_path(name, f"cannot be created: {exc.strerror}")
        return storage_error(exc, f"write upload member {name!r}")


class _Sink:
    """One file being written: counts bytes against the limit and hashes them."""

    def __init__(self, writer: _Writer, name: str, path: str, handle: IO[bytes]):
        self.writer = writer
        self.name = name
        self.path = path
        self.handle = handle
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        self.writer.written += len(data)
        if self.writer.written > self.writer.max_bytes:
            raise self.writer._too_large()
        self.digest.update(data)
        try:
            self.handle.write(data)
        except OSError as exc:
            raise storage_error(exc, f"write upload member {self.name!r}") from exc

    def close(self) -> None:
        try:
            self.handle.close()
        except OSError as exc:
            raise storage_error(exc, f"write upload member {self.name!r}") from exc
        self.writer.out.files[self.path] = FileRecord(self.size, self.digest.hexdigest())

    def abort(self) -> None:
        try:
            self.handle.close()
        except OSError:
            pass


class _Bounded:
    """A read-only stream that refuses to give more than ``cap`` bytes (a decompression bomb's guard)."""

    def __init__(self, stream: Any, cap: int, too_large: ApiError):
        self.stream = stream
        self.cap = cap
        self.seen = 0
        self.too_large = too_large

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.seen += len(data)
        if self.seen > self.cap:
            raise self.too_large
        return data


class _GuardedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses a huge PAX header or GNU long name before tarfile reads it into memory."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _META_TYPES and self.size > _MAX_META_BYTES:
            raise bad_archive(f"the archive has a {self.size}-byte extended header; at most {_MAX_META_BYTES} are read")
        return super()._proc_member(tar)  # type: ignore[misc]


def unpack_tar(body: Path, dest: Path, max_files: int, max_bytes: int) -> Unpacked:
    writer = _Writer(dest, max_files, max_bytes)
    cap = max_bytes + _TAR_OVERHEAD_PER_MEMBER * (max_files + 1) + _CHUNK
    with open(body, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream: Any = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        try:
            with tarfile.open(fileobj=_Bounded(stream, cap, writer._too_large()), mode="r|",
                              tarinfo=_GuardedTarInfo) as tar:
                for member in tar:
                    _extract(tar, member, writer)
        except ApiError:
            raise
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as exc:
            kind = "tar.gz" if gzipped else "tar"
            raise bad_archive(f"the body is not a valid {kind} archive: {exc or type(exc).__name__}") from None
    return writer.out


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, writer: _Writer) -> None:
    name = member.name
    if member.isdir():
        writer.directory(name)
        return
    if not member.isreg():
        kind = ("a symlink" if member.issym() else "a hard link" if member.islnk() else "a fifo" if member.isfifo()
                else "a device" if member.isdev() else "not a regular file or directory")
        raise bad_path(name, f"is {kind}; an upload may hold only regular files and directories")
    sink = writer.file(name, member.size)
    source = tar.extractfile(member)
    try:
        assert source is not None  # a regular member always has data
        while chunk := source.read(_CHUNK):
            sink.write(chunk)
        if sink.size != member.size:
            raise bad_archive(f"the archive ends inside member {name!r}")
    except BaseException:
        sink.abort()
        raise
    sink.close()


def unpack_multipart(body: Path, boundary: bytes, dest: Path, max_files: int, max_bytes: int) -> Unpacked:
    writer = _Writer(dest, max_files, max_bytes)
    form = _Form(writer)
    try:
        parser = MultipartParser(boundary, form.callbacks())
        with open(body, "rb") as f:
            while chunk := f.read(_CHUNK):
                parser.write(chunk)
                if form.ended:
                    break
        parser.finalize()
    except ApiError:
        form.abort()
        raise
    except (MultipartParseError, FormParserError, ValueError) as exc:
        form.abort()
        raise bad_archive(f"the body is not a valid multipart/form-data: {exc}") from None
    if not form.ended:
        form.abort()
        raise bad_archive("the multipart/form-data body ends before its closing boundary")
    return writer.out


class _Form:
    """python-multipart callbacks that write each ``files`` part to its path."""

    def __init__(self, writer: _Writer):
        self.writer = writer
        self.headers: dict[bytes, bytes] = {}
        self.field = bytearray()
        self.value = bytearray()
        self.header_bytes = 0
        self.sink: _Sink | None = None
        self.ended = False

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self.headers = {}
        self.header_bytes = 0

    def _grow(self, buffer: bytearray, data: bytes, start: int, end: int) -> None:
        self.header_bytes += end - start
        if self.header_bytes > _MAX_PART_HEADERS:
            raise bad_archive(f"a multipart part has more than {_MAX_PART_HEADERS} bytes of headers")
        buffer += data[start:end]

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._grow(self.field, data, start, end)

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._grow(self.value, data, start, end)

    def _header_end(self) -> None:
        self.headers[bytes(self.field).strip().lower()] = bytes(self.value).strip()
        self.field.clear()
        self.value.clear()

    def _headers_finished(self) -> None:
        raw = self.headers.get(b"content-disposition", b"")
        disposition, options = parse_options_header(raw.decode("latin-1"))
        if disposition != b"form-data":
            raise bad_archive("every multipart part needs 'Content-Disposition: form-data'")
        field_name = options.get(b"name", b"").decode("latin-1")
        if field_name != "files":
            raise bad_archive(f"unexpected form field {field_name!r}: every part of an upload is named 'files'")
        if b"filename" not in options:
            raise bad_archive("a 'files' part has no filename (its path in the version)")
        # a backslash or NUL is refused on the raw header: the parser unescapes and shortens "C:\..." names
        if b"\\" in raw or b"\x00" in raw:
            shown = options[b"filename"].decode("latin-1")
            raise bad_path(shown, "contains a backslash" if b"\\" in raw else "contains a NUL byte")
        try:
            filename = options[b"filename"].decode("utf-8")  # the header's bytes, as the client encoded them
        except UnicodeDecodeError:
            raise bad_path(options[b"filename"].decode("latin-1"), "is not valid UTF-8") from None
        self.sink = self.writer.file(filename)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.sink is not None:
            self.sink.write(memoryview(data)[start:end])

    def _part_end(self) -> None:
        if self.sink is not None:
            sink, self.sink = self.sink, None
            sink.close()

    def _end(self) -> None:
        self.ended = True

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.abort()
            self.sink = None
