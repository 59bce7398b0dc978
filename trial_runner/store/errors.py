"""What goes wrong when reading or writing a URI, and whether trying again can help.

Every failure of the store reaches its caller as a `StoreError`. `as_store_errors` turns boto3's, the
network's and the local disk's exceptions into one: wrong credentials, a missing bucket or object and a
full disk are final (the message says what to fix); network failures, throttling, 5xx and an object that
changed while it was read are retryable.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import botocore.exceptions

# A 4xx with one of these codes will fail again the same way: the fix is the secret or the URI.
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "403", "AllAccessDisabled"}
)
_TOKEN_CODES = frozenset({"ExpiredToken", "InvalidToken", "TokenRefreshRequired"})
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_RETRYABLE_CODES = frozenset(
    {
        "PreconditionFailed",  # the object changed since it was listed: list again
        "412",
        "InvalidRange",  # a partial file longer than the object now is
        "416",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
    }
)
_CREDENTIALS_FIX = (
    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the S3 Secret the trial reads) and that this key may read "
    "and write the bucket"
)


class StoreError(Exception):
    """A URI that could not be read or written. `retryable` says whether trying again can help.

    Not retryable: a bad URI, missing bucket, object or prefix, wrong or missing credentials, access
    denied, pickled-only weights, a model that is not a safetensors checkpoint; the message names the URI
    and the fix. Retryable: network failures, a server that went away or throttles, an object that
    changed or arrived truncated or corrupt (nothing of it was committed to the cache).
    """

    def __init__(self, uri: str, message: str, *, retryable: bool):
        super().__init__(f"{uri}: {message}")
        self.uri, self.message, self.retryable = uri, message, retryable

    def __reduce__(self) -> tuple[Any, ...]:  # survives pickling (multiprocessing, executors)
        return _rebuild_store_error, (self.uri, self.message, self.retryable)


def _rebuild_store_error(uri: str, message: str, retryable: bool) -> StoreError:
    return StoreError(uri, message, retryable=retryable)


@contextlib.contextmanager
def as_store_errors(uri: str, action: str) -> Iterator[None]:
    """Turn boto3's exceptions into `StoreError`s that say whether to retry and what to fix."""
    try:
        yield
    except StoreError:
        raise
    except Exception as exc:
        error = _classify(exc, uri, action)
        if error is None:
            raise
        raise error from exc


def _classify(exc: BaseException, uri: str, action: str) -> StoreError | None:
    cause: BaseException | None = exc
    while cause is not None:  # s3transfer wraps the ClientError of a failed upload
        if isinstance(cause, botocore.exceptions.ClientError):
            break
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, botocore.exceptions.ClientError):
        error = cause.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        detail = f"{code or status}: {error.get('Message') or 'no message'}"
        if code in _CREDENTIAL_CODES or (status == 403 and code not in _TOKEN_CODES):
            return StoreError(uri, f"cannot {action} ({detail}); {_CREDENTIALS_FIX}", retryable=False)
        if code in _TOKEN_CODES:
            return StoreError(
                uri, f"cannot {action} ({detail}); renew the session token in the S3 Secret", retryable=False
            )
        if code == "NoSuchBucket":
            return StoreError(
                uri, f"cannot {action}: the bucket does not exist; check the URI and AWS_ENDPOINT_URL", retryable=False
            )
        if code in _MISSING_CODES or status == 404:
            return StoreError(uri, f"cannot {action}: no such object; check the URI", retryable=False)
        if code in ("PreconditionFailed", "412") or status == 412:
            return StoreError(
                uri, f"the object changed while being read ({detail}); it will be listed again", retryable=True
            )
        if code in _RETRYABLE_CODES or status >= 500 or status == 429:
            return StoreError(uri, f"cannot {action} ({detail}); the server may recover", retryable=True)
        return StoreError(uri, f"cannot {action} ({detail})", retryable=False)
    if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
        return StoreError(
            uri, f"cannot {action}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", retryable=False
        )
    if isinstance(
        exc,
        botocore.exceptions.HTTPClientError  # includes broken streams and read timeouts
        | botocore.exceptions.ConnectionError
        | botocore.exceptions.IncompleteReadError
        | botocore.exceptions.ChecksumError,
    ):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the S3 endpoint"
        return StoreError(uri, f"cannot {action}: network failure talking to {endpoint} ({exc})", retryable=True)
    if isinstance(exc, ConnectionError | TimeoutError):  # a socket error that botocore did not wrap
        return StoreError(uri, f"cannot {action}: network failure ({exc})", retryable=True)
    if isinstance(exc, OSError):  # the local disk: full, read-only, permissions
        return StoreError(uri, f"cannot {action}: local I/O error ({exc}); check the cache directory", retryable=False)
    if isinstance(exc, botocore.exceptions.BotoCoreError | ValueError):  # e.g. a malformed AWS_ENDPOINT_URL
        return StoreError(uri, f"cannot {action}: {exc}", retryable=False)
    return None
