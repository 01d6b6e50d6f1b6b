"""kmsg-worker: crash-safe, distributed delivery of Korean SMS, LMS, MMS and Kakao messages.

The public surface::

    from kmsg_worker import KMsg

    with KMsg() as kmsg:
        receipt = kmsg.send(to="010-1234-5678", text="인증번호 [123456]")
        print(kmsg.get(receipt.message_id).status)
"""

from kmsg_worker.errors import (
    AcceptanceUnknownError,
    BatchValidationError,
    ConfigurationError,
    ErrorCode,
    IdempotencyConflictError,
    InvalidStateError,
    KmsgError,
    MessageNotFoundError,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderTransientError,
    StorageUnavailableError,
    ValidationError,
)
from kmsg_worker.message import Message, MessageType, Priority, count_bytes, normalize
from kmsg_worker.producer import BatchReceipt, KMsg, MessageInfo, Receipt
from kmsg_worker.settings import Settings
from kmsg_worker.status import MessageStatus

__all__ = [
    "AcceptanceUnknownError",
    "BatchReceipt",
    "BatchValidationError",
    "ConfigurationError",
    "ErrorCode",
    "IdempotencyConflictError",
    "InvalidStateError",
    "KMsg",
    "KmsgError",
    "Message",
    "MessageInfo",
    "MessageNotFoundError",
    "MessageStatus",
    "MessageType",
    "Priority",
    "ProviderError",
    "ProviderRateLimited",
    "ProviderRejected",
    "ProviderTimeout",
    "ProviderTransientError",
    "Receipt",
    "Settings",
    "StorageUnavailableError",
    "ValidationError",
    "count_bytes",
    "normalize",
]

__version__ = "0.1.0"
