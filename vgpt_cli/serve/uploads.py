"""Reading a multipart upload into memory, with limits, and naming whatever is wrong with it.

The body is parsed as it streams in (python-multipart's push parser) into bytes held in memory:
nothing is written to disk (Starlette's own form parser spools parts over 1 MB to temporary files),
and no name from the request is ever used as a path. Limits are checked while reading, so a body
over the size limit or with too many files is refused before the rest of it is read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

FIELD = "images"  # the form field that carries the images (repeat it for several)


class UploadError(Exception):
    """A request the server refuses: an HTTP status and one line naming the problem and the fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Upload:
    filename: str          # only a label for messages and the answer; never opened
    content_type: str
    data: bytes


def _mb(n: int) -> str:
    return f"{n / 1_000_000:g} MB"


async def read_uploads(content_type: str | None, content_length: str | None, body: AsyncIterator[bytes], *,
                       max_bytes: int, max_files: int) -> list[Upload]:
    """The image parts of a multipart/form-data body, in order; UploadError for anything wrong."""
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data":
        shown = (content_type or "none").split(";")[0]
        raise UploadError(415, f"content type {shown}: send multipart/form-data with the images in the "
                               f"'{FIELD}' field (curl -F {FIELD}=@photo.jpg)")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary: let the HTTP client build the body")
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise UploadError(400, f"Content-Length {content_length!r} is not a number") from None
        if declared > max_bytes:
            raise UploadError(413, f"the body is {_mb(declared)}, over the limit of {_mb(max_bytes)}; send fewer "
                                   "or smaller images (or start the server with a larger --max-upload-mb)")

    uploads: list[Upload] = []
    part: dict = {}
    headers: dict[bytes, bytes] = {}
    field_name = bytearray()
    field_value = bytearray()
    problems: list[UploadError] = []

    def on_part_begin() -> None:
        part.clear()
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        field_value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(field_name).lower()] = bytes(field_value)
        field_name.clear()
        field_value.clear()

    def on_headers_finished() -> None:
        _, disp = parse_options_header(headers.get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        filename = disp.get(b"filename")
        part_type = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if name != FIELD:
            problems.append(UploadError(400, f"unexpected form field {name!r}: send the images in the '{FIELD}' "
                                             "field and nothing else"))
            return
        if filename is None:
            problems.append(UploadError(400, f"the '{FIELD}' field holds text, not a file: attach the image as a "
                                             f"file (curl -F {FIELD}=@photo.jpg)"))
            return
        label = filename.decode("utf-8", "replace") or f"image {len(uploads) + 1}"
        if part_type and not (part_type.startswith("image/") or part_type == "application/octet-stream"):
            problems.append(UploadError(415, f"{label}: content type {part_type} is not an image; send JPEG, PNG "
                                             "or another image file"))
            return
        if len(uploads) >= max_files:
            problems.append(UploadError(413, f"more than {max_files} files in one request; send at most "
                                             f"{max_files} (or start the server with a larger --max-files)"))
            return
        part["upload"] = Upload(label, part_type or "application/octet-stream", b"")
        part["chunks"] = []

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if "chunks" in part:
            part["chunks"].append(data[start:end])

    def on_part_end() -> None:
        if "upload" in part:
            part["upload"].data = b"".join(part["chunks"])
            uploads.append(part["upload"])
        part.clear()

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end})
    received = 0
    async for chunk in body:
        received += len(chunk)
        if received > max_bytes:  # a chunked body, or a Content-Length that lied
            raise UploadError(413, f"the body is over the limit of {_mb(max_bytes)}; send fewer or smaller images "
                                   "(or start the server with a larger --max-upload-mb)")
        try:
            parser.write(chunk)
        except MultipartParseError as e:
            raise UploadError(400, f"the multipart body cannot be parsed ({e}); let the HTTP client build it") from None
        if problems:
            raise problems[0]
    try:
        parser.finalize()
    except MultipartParseError as e:
        raise UploadError(400, f"the multipart body cannot be parsed ({e}); let the HTTP client build it") from None
    if problems:
        raise problems[0]
    if "upload" in part:  # the body stopped inside a file: the closing boundary never came
        raise UploadError(400, f"the body ends inside {part['upload'].filename} (a cut-off upload); send it again")
    if not uploads:
        raise UploadError(400, f"no '{FIELD}' field: send one or more images as multipart form field '{FIELD}' "
                               f"(curl -F {FIELD}=@photo.jpg)")
    return uploads
