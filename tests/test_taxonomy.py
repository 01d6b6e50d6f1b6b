"""The error taxonomy end to end: every documented provider code lands on its ErrorCode, class and
blame; the operator's overrides (``KMSG_RETRY_POLICY``); per type/priority retry limits; and the
backoff bounds as properties."""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsg_worker.delivery import deliver
from kmsg_worker.errors import (
    ConfigurationError,
    ErrorCode,
    ProviderConnectionError,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderTransientError,
)
from kmsg_worker.producer import KMsg
from kmsg_worker.providers import aligo, iwinv, solapi
from kmsg_worker.providers.base import ProviderConfig
from kmsg_worker.providers.base_http import HttpProvider, make_http_client
from kmsg_worker.providers.mock import build_error
from kmsg_worker.retry import Action, backoff_delay, decide
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import RetryPolicy, Settings
from kmsg_worker.status import MessageStatus as S
from kmsg_worker.taxonomy import PERMANENT, TRANSIENT, ErrorPolicy, classify, parse_error_policy
from tests.conftest import RecordingDispatcher
from tests.providers.test_aligo import Wire, error_of, wired
from tests.providers.test_aligo import sms as aligo_sms
from tests.providers.test_iwinv import _answer, mocked, refusal
from tests.providers.test_iwinv import alimtalk as iwinv_alimtalk
from tests.providers.test_iwinv import sms as iwinv_sms
from tests.providers.test_solapi import mock_provider
from tests.providers.test_solapi import sms as solapi_sms
from tests.scripted import ScriptedProvider, calls_to, error

# -- every provider table -------------------------------------------------------------------------


def _solapi_failed(code: str) -> ProviderError:
    def handler(request: httpx.Request) -> httpx.Response:
        (wire,) = json.loads(request.content)["messages"]
        failed = {"messageId": "M1", "statusCode": code, "statusMessage": "x", "customFields": wire["customFields"]}
        return httpx.Response(
            200, json={"groupInfo": {"groupId": "G1"}, "messageList": [], "failedMessageList": [failed]}
        )

    outcome = mock_provider(handler).send(solapi_sms())
    assert not outcome.accepted and outcome.error is not None
    return outcome.error


@pytest.mark.parametrize(("code", "rule"), sorted(solapi.SOLAPI_CODES.items()))
def test_every_solapi_status_code(code: str, rule: solapi.CodeRule) -> None:
    error = _solapi_failed(code)
    assert (error.code, error.blame, error.retryable, error.provider_code) == (
        rule.code,
        rule.blame,
        rule.retryable,
        code,
    )


@pytest.mark.parametrize(("code", "rule"), sorted(solapi.SOLAPI_ERROR_CODES.items()))
def test_every_solapi_http_error_code(code: str, rule: solapi.CodeRule) -> None:
    provider = mock_provider(lambda request: httpx.Response(400, json={"errorCode": code, "errorMessage": "m"}))
    with pytest.raises(ProviderError) as info:
        provider.send(solapi_sms())
    error = info.value
    assert (error.code, error.blame, error.retryable) == (rule.code, rule.blame, rule.retryable)
    assert (error.provider_code, error.status_code, error.provider_message) == (code, 400, "m")


_IWINV_CLASS = {"rejected": ProviderRejected, "transient": ProviderTransientError, "rate_limited": ProviderRateLimited}


@pytest.mark.parametrize(("code", "rule"), sorted(iwinv.ALIMTALK_ERRORS.items()))
def test_every_iwinv_alimtalk_code(code: int, rule: iwinv.ErrorRule) -> None:
    error = refusal(mocked(_answer({"code": code, "message": f"오류 {code}"})), iwinv_alimtalk())
    assert type(error) is _IWINV_CLASS[rule.kind]
    assert (error.code, error.blame, error.provider_code) == (rule.code, rule.blame, str(code))


@pytest.mark.parametrize(("code", "rule"), sorted(iwinv.SMS_ERRORS.items()))
def test_every_iwinv_sms_code(code: int, rule: iwinv.ErrorRule) -> None:
    error = refusal(mocked(_answer({"resultCode": code})), iwinv_sms())
    assert type(error) is _IWINV_CLASS[rule.kind]
    assert (error.code, error.blame, error.provider_code) == (rule.code, rule.blame, str(code))


@pytest.mark.parametrize("code", sorted(aligo.ERROR_CODES))
def test_every_aligo_code(code: str) -> None:
    error = error_of(wired(Wire({"result_code": code, "message": "오류"})), aligo_sms())
    assert (error.code, error.blame, error.retryable, error.provider_code) == (
        aligo.ERROR_CODES[code],
        aligo.ERROR_BLAME[code],
        False,
        code,
    )


@pytest.mark.parametrize(
    ("name", "get_error"),
    [
        ("solapi", lambda: _solapi_failed("9876")),
        ("iwinv-alimtalk", lambda: refusal(mocked(_answer({"code": 777, "message": "?"})), iwinv_alimtalk())),
        ("iwinv-sms", lambda: refusal(mocked(_answer({"resultCode": 77})), iwinv_sms())),
        ("aligo", lambda: error_of(wired(Wire({"result_code": "-777", "message": "?"})), aligo_sms())),
    ],
)
def test_unknown_provider_codes_keep_their_raw_code(name: str, get_error: Any) -> None:
    error = get_error()
    # Unclassified, blamed on the provider (another may succeed), and the vendor's code kept verbatim
    assert error.code is ErrorCode.PROVIDER_ERROR or error.code is ErrorCode.INVALID_REQUEST
    assert error.blame == "provider"
    assert error.provider_code in {"9876", "777", "77", "-777"}


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_mock_code_maps_onto_a_consistent_class(code: ErrorCode) -> None:
    error = build_error("mock", {"code": code.value})
    assert error.code is code
    if code is ErrorCode.NETWORK_TIMEOUT:
        assert isinstance(error, ProviderTimeout)
    elif code is ErrorCode.NETWORK_ERROR:
        assert isinstance(error, ProviderConnectionError)
    elif code is ErrorCode.RATE_LIMIT_EXCEEDED:
        assert isinstance(error, ProviderRateLimited)
    assert error.retryable is (code in TRANSIENT or code in (ErrorCode.PROVIDER_ERROR, ErrorCode.UNKNOWN_ERROR))
    assert build_error("mock", {"code": "NOT_A_CODE"}).code is ErrorCode.PROVIDER_ERROR


class _Plain(HttpProvider):
    name = "plain"


@pytest.mark.parametrize(
    ("status", "cls", "code"),
    [
        (400, ProviderRejected, ErrorCode.INVALID_REQUEST),
        (401, ProviderRejected, ErrorCode.AUTHENTICATION_FAILED),
        (403, ProviderRejected, ErrorCode.AUTHENTICATION_FAILED),
        (404, ProviderRejected, ErrorCode.INVALID_REQUEST),
        (408, ProviderTransientError, ErrorCode.NETWORK_SERVICE_UNAVAILABLE),
        (425, ProviderTransientError, ErrorCode.NETWORK_SERVICE_UNAVAILABLE),
        (429, ProviderRateLimited, ErrorCode.RATE_LIMIT_EXCEEDED),
        (500, ProviderTransientError, ErrorCode.NETWORK_SERVICE_UNAVAILABLE),
        (503, ProviderTransientError, ErrorCode.NETWORK_SERVICE_UNAVAILABLE),
    ],
)
def test_http_statuses_of_the_shared_tier(status: int, cls: type[ProviderError], code: ErrorCode) -> None:
    provider = _Plain(ProviderConfig(name="plain"), make_http_client())
    error = provider.http_error(httpx.Response(status, headers={"Retry-After": "7"}))
    assert type(error) is cls and error.code is code and error.status_code == status
    assert error.retry_after == (7 if status == 429 else None)


def _all_rules() -> Iterator[tuple[str, ErrorCode, str, bool]]:
    for key, solapi_rule in {**solapi.SOLAPI_CODES, **solapi.SOLAPI_ERROR_CODES}.items():
        yield f"solapi:{key}", solapi_rule.code, solapi_rule.blame, solapi_rule.retryable
    for number, iwinv_rule in {**iwinv.ALIMTALK_ERRORS, **iwinv.SMS_ERRORS}.items():
        yield f"iwinv:{number}", iwinv_rule.code, iwinv_rule.blame, iwinv_rule.kind != "rejected"
    for key, aligo_code in aligo.ERROR_CODES.items():
        yield f"aligo:{key}", aligo_code, aligo.ERROR_BLAME[key], False


def test_the_tables_agree_with_the_taxonomy() -> None:
    rules = list(_all_rules())
    assert len(rules) > 100
    for where, code, blame, retryable in rules:
        # A message-caused refusal is never retried (nor failed over), whoever reports it
        assert not (blame == "message" and retryable), where
        if code in PERMANENT:
            assert not retryable, where
        if code in TRANSIENT:
            assert retryable, where
    assert not PERMANENT & TRANSIENT


# -- operator overrides ---------------------------------------------------------------------------


def rejected(code: ErrorCode = ErrorCode.INSUFFICIENT_BALANCE, **kw: Any) -> ProviderRejected:
    return ProviderRejected("refused", provider="iwinv", code=code, **kw)


def transient(code: ErrorCode = ErrorCode.PROVIDER_ERROR, **kw: Any) -> ProviderTransientError:
    return ProviderTransientError("busy", provider="iwinv", code=code, **kw)


def policy(**raw: Any) -> ErrorPolicy:
    return parse_error_policy(raw)


def test_no_override_returns_the_error_itself() -> None:
    error = rejected()
    assert classify(error, ErrorPolicy()) is error
    assert classify(error, policy(retryable_codes=["RATE_LIMIT_EXCEEDED"])) is error


def test_a_permanent_code_made_retryable_keeps_everything_else() -> None:
    original = rejected(provider_code="519", status_code=200, blame="provider", provider_message="잔액 부족")
    changed = classify(original, policy(retryable_codes=["INSUFFICIENT_BALANCE"]))
    assert isinstance(changed, ProviderTransientError) and changed.retryable
    assert (changed.code, changed.provider_code, changed.status_code, changed.blame, changed.provider_message) == (
        ErrorCode.INSUFFICIENT_BALANCE,
        "519",
        200,
        "provider",
        "잔액 부족",
    )
    assert changed.__cause__ is original and str(changed) == str(original)
    assert isinstance(original, ProviderRejected)  # the input is never modified


def test_a_retryable_code_made_permanent() -> None:
    changed = classify(transient(provider_code="518"), policy(non_retryable_codes=["PROVIDER_ERROR"]))
    assert isinstance(changed, ProviderRejected) and not changed.retryable and changed.provider_code == "518"


def test_provider_codes_are_more_specific_than_normalised_codes() -> None:
    rules = policy(non_retryable_codes=["PROVIDER_ERROR"], retryable_codes=["iwinv:518"])
    assert classify(transient(provider_code="518"), rules).retryable
    assert not classify(transient(provider_code="599"), rules).retryable
    # A raw code nobody documented can be classified by its provider-qualified name
    assert classify(
        rejected(ErrorCode.INVALID_REQUEST, provider_code="300"), policy(retryable_codes=["iwinv:300"])
    ).retryable


def test_codes_win_over_statuses_and_non_retryable_wins_within_each() -> None:
    rules = policy(retryable_codes=["INSUFFICIENT_BALANCE"], non_retryable_statuses=[402], retryable_statuses=[409])
    assert classify(rejected(status_code=402), rules).retryable
    assert not classify(transient(status_code=402), rules).retryable
    assert classify(rejected(ErrorCode.INVALID_REQUEST, status_code=409), rules).retryable


def test_a_timeout_is_never_made_permanent() -> None:
    timeout = ProviderTimeout("t", provider="iwinv", code=ErrorCode.NETWORK_TIMEOUT, status_code=504)
    assert classify(timeout, policy(non_retryable_statuses=[504])) is timeout


def test_retry_after_fills_in_when_the_provider_said_nothing() -> None:
    rules = policy(
        retry_after={"by_code": {"iwinv:11": 40, "NETWORK_SERVICE_UNAVAILABLE": 20}, "by_status": {"503": 9}}
    )
    busy = transient(ErrorCode.NETWORK_SERVICE_UNAVAILABLE, provider_code="11")
    assert classify(busy, rules).retry_after == 40 and busy.retry_after is None
    assert classify(transient(ErrorCode.NETWORK_SERVICE_UNAVAILABLE), rules).retry_after == 20
    assert classify(transient(status_code=503), rules).retry_after == 9
    # The provider's own Retry-After wins; a permanent error gets no wait
    assert classify(transient(status_code=503, retry_after=2.5), rules).retry_after == 2.5
    assert classify(rejected(status_code=503), rules).retry_after is None


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("{nope", "is invalid"),
        ('["RATE_LIMIT_EXCEEDED"]', "JSON object"),
        ('{"retryable": []}', "unknown field"),
        ('{"retryable_codes": ["NOT_A_CODE"]}', "unknown code"),
        ('{"retryable_codes": "PROVIDER_ERROR"}', "must be a list"),
        ('{"retryable_codes": [":3"]}', "provider:code"),
        ('{"retryable_codes": ["PROVIDER_ERROR"], "non_retryable_codes": ["provider_error"]}', "both"),
        ('{"non_retryable_codes": ["NETWORK_TIMEOUT"]}', "reconciled"),
        ('{"retryable_statuses": [700]}', "HTTP status"),
        ('{"retryable_statuses": [503], "non_retryable_statuses": ["503"]}', "both"),
        ('{"retry_after": {"by_code": {"RATE_LIMIT_EXCEEDED": -1}}}', ">= 0"),
        ('{"retry_after": {"by_status": {"abc": 5}}}', "HTTP status"),
        ('{"retry_after": {"later": {}}}', "by_code"),
    ],
)
def test_invalid_retry_policy_stops_the_start_naming_the_variable(raw: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"KMSG_RETRY_POLICY": raw})
    assert info.value.variable == "KMSG_RETRY_POLICY" and fragment in str(info.value)


def test_retry_policy_from_the_environment() -> None:
    raw = {
        "retryable_codes": ["insufficient_balance", "IWINV:519"],
        "non_retryable_codes": ["PROVIDER_ERROR"],
        "retryable_statuses": ["409"],
        "retry_after": {"by_code": {"RATE_LIMIT_EXCEEDED": 5}, "by_status": {"503": 30}},
    }
    parsed = Settings.from_env({"KMSG_RETRY_POLICY": json.dumps(raw)}).error_policy
    assert parsed.retryable_codes == {"INSUFFICIENT_BALANCE", "iwinv:519"}
    assert parsed.retryable_statuses == {409} and parsed.retry_after_by_status == {503: 30.0}
    assert Settings.from_env({}).error_policy.empty


# -- per type and priority ------------------------------------------------------------------------


def test_retry_limits_by_type_and_priority() -> None:
    env = {
        "KMSG_RETRY_BY_TYPE": json.dumps(
            {"ALIMTALK": {"max_attempts": 2, "max_age_seconds": 60}, "LMS": {"max_age_seconds": 21600}}
        ),
        "KMSG_RETRY_MAX_ATTEMPTS": "4",
    }
    s = Settings.from_env(env)
    assert (s.retry_for("ALIMTALK", "normal").max_attempts, s.retry_for("ALIMTALK", "normal").max_age) == (2, 60)
    assert (s.retry_for("LMS", "normal").max_attempts, s.retry_for("LMS", "normal").max_age) == (4, 21600)
    assert s.retry_for("SMS", "normal") == s.retry
    # OTPs give up fast by default; against a type override the stricter limit wins
    assert (s.retry_for("SMS", "high").max_attempts, s.retry_for("SMS", "high").max_age) == (3, 300)
    assert (s.retry_for("LMS", "high").max_attempts, s.retry_for("LMS", "high").max_age) == (3, 300)
    assert (s.retry_for("ALIMTALK", "high").max_attempts, s.retry_for("ALIMTALK", "high").max_age) == (2, 60)
    relaxed = Settings.from_env({"KMSG_RETRY_BY_PRIORITY": '{"high": {"max_age_seconds": 900}}'})
    assert (relaxed.retry_for("SMS", "high").max_attempts, relaxed.retry_for("SMS", "high").max_age) == (5, 900)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("KMSG_RETRY_BY_TYPE", '{"PIGEON": {"max_attempts": 1}}'),
        ("KMSG_RETRY_BY_TYPE", '{"SMS": {"max_tries": 1}}'),
        ("KMSG_RETRY_BY_TYPE", '{"SMS": {"max_attempts": 0}}'),
        ("KMSG_RETRY_BY_TYPE", '{"SMS": {"max_age_seconds": "soon"}}'),
        ("KMSG_RETRY_BY_TYPE", '{"SMS": {}}'),
        ("KMSG_RETRY_BY_PRIORITY", '{"urgent": {"max_attempts": 1}}'),
        ("KMSG_RETRY_BY_PRIORITY", "[]"),
    ],
)
def test_invalid_retry_limits_name_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({name: raw})
    assert info.value.variable == name


def test_a_message_past_its_age_is_not_failed_over() -> None:
    stale = decide(
        rejected(ErrorCode.AUTHENTICATION_FAILED),
        provider_attempts=1,
        age_seconds=61,
        has_next_provider=True,
        policy=RetryPolicy(max_age=60),
    )
    assert stale.action is Action.FAIL


# -- backoff properties ---------------------------------------------------------------------------

policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 20),
    base_delay=st.floats(0.01, 30),
    max_delay=st.floats(0.01, 3600),
    jitter=st.floats(0, 0.99),
)


@settings(max_examples=300, deadline=None)
@given(attempt=st.integers(1, 64), policy=policies, seed=st.integers(0, 2**32))
def test_backoff_is_positive_bounded_and_exponential(attempt: int, policy: RetryPolicy, seed: int) -> None:
    delay = backoff_delay(attempt, policy, rng=random.Random(seed))
    capped = min(policy.base_delay * 2 ** (attempt - 1), policy.max_delay)
    assert delay > 0
    # Within the jitter band around the capped exponential value (never pulled to zero: the floor
    # is the base delay's lower jitter bound)
    assert delay <= max(capped * (1 + policy.jitter), policy.base_delay * (1 - policy.jitter), 0.05) + 1e-9
    assert delay >= min(capped * (1 - policy.jitter), policy.base_delay * (1 - policy.jitter)) - 1e-9
    assert delay <= max(policy.max_delay, policy.base_delay) * (1 + policy.jitter) + 0.05


@settings(max_examples=300, deadline=None)
@given(
    attempt=st.integers(1, 64),
    policy=policies,
    retry_after=st.floats(0, 7200),
    seed=st.integers(0, 2**32),
)
def test_backoff_respects_retry_after(attempt: int, policy: RetryPolicy, retry_after: float, seed: int) -> None:
    without = backoff_delay(attempt, policy, rng=random.Random(seed))
    with_it = backoff_delay(attempt, policy, retry_after=retry_after, rng=random.Random(seed))
    assert with_it >= retry_after and with_it == max(without, retry_after)


@settings(max_examples=200, deadline=None)
@given(
    attempts=st.integers(1, 30),
    retry_after=st.one_of(st.none(), st.floats(0, 600)),
    status=st.sampled_from([429, 500, 503]),
)
def test_every_decided_delay_is_positive_and_countdowns_stay_below_the_visibility_timeout(
    attempts: int, retry_after: float | None, status: int
) -> None:
    s = Settings.from_env({})
    error = ProviderTransientError("x", code=ErrorCode.NETWORK_SERVICE_UNAVAILABLE, status_code=status)
    error.retry_after = retry_after
    decision = decide(error, provider_attempts=attempts, age_seconds=1, has_next_provider=False, policy=s.retry)
    if decision.action is Action.RETRY:
        assert decision.delay > 0
    # The pipeline publishes a countdown only up to max_countdown; beyond, next_attempt_at waits
    assert s.retry.max_countdown * 10 <= s.visibility_timeout


def test_a_countdown_near_the_visibility_timeout_is_refused_at_start() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"KMSG_RETRY_MAX_COUNTDOWN_SECONDS": "600", "KMSG_VISIBILITY_TIMEOUT": "3600"})
    assert info.value.variable == "KMSG_RETRY_MAX_COUNTDOWN_SECONDS"


# -- in the pipeline ------------------------------------------------------------------------------


class DbClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def rt(backend_url: str, settings_factory: Any, dispatcher: RecordingDispatcher) -> Iterator[Runtime]:
    ScriptedProvider.reset()
    settings = settings_factory(
        backend_url,
        KMSG_PROVIDERS="scripted_a,scripted_b",
        KMSG_CIRCUIT_ENABLED="false",
        KMSG_RETRY_POLICY=json.dumps(
            {
                "retryable_codes": ["scripted_a:BAL"],
                "retry_after": {"by_status": {"503": 45}},
            }
        ),
        KMSG_RETRY_BY_TYPE='{"LMS": {"max_attempts": 2}}',
    )
    runtime = Runtime(settings, dispatcher=dispatcher)
    runtime.now = DbClock()
    yield runtime
    runtime.close()
    ScriptedProvider.reset()


def _next_wait(rt: Runtime, message_id: str) -> float:
    row = rt.store.get(message_id)
    assert row is not None and row.next_attempt_at is not None
    at = row.next_attempt_at
    return ((at if at.tzinfo else at.replace(tzinfo=UTC)) - rt.now()).total_seconds()


def test_the_pipeline_applies_the_policy_overrides(rt: Runtime, dispatcher: RecordingDispatcher) -> None:
    kmsg = KMsg(runtime=rt)
    # A balance refusal with raw code BAL would fail over; the policy makes it a retry on scripted_a
    ScriptedProvider.script["scripted_a"] = deque(
        [
            error(ProviderRejected, "scripted_a", code=ErrorCode.INSUFFICIENT_BALANCE, provider_code="BAL"),
            error(ProviderTransientError, "scripted_a", code=ErrorCode.NETWORK_SERVICE_UNAVAILABLE, status_code=503),
        ]
    )
    mid = kmsg.send(to="01012345678", text="hi").message_id
    assert deliver(rt, mid).action == "retry"
    row = rt.store.get(mid)
    assert row is not None and row.status == S.RETRYING and row.route_index == 0
    rt.now.now += timedelta(seconds=5)  # type: ignore[attr-defined]
    # A 503 without Retry-After waits the configured 45 s (below max_countdown: a countdown)
    assert deliver(rt, mid).action == "retry"
    assert _next_wait(rt, mid) >= 45
    countdowns = [c for m, _, c in dispatcher.sends if m == mid and c is not None]
    assert all(0 < c <= rt.settings.retry.max_countdown for c in countdowns) and countdowns[-1] >= 45


def test_the_pipeline_applies_per_type_attempts(rt: Runtime) -> None:
    kmsg = KMsg(runtime=rt)
    down = error(ProviderTransientError, "scripted_a", code=ErrorCode.NETWORK_SERVICE_UNAVAILABLE, status_code=503)
    ScriptedProvider.down["scripted_a"] = down
    lms_id = kmsg.send(to="01012345678", text="long", type="LMS", subject="s").message_id
    actions = []
    for _ in range(3):
        actions.append(deliver(rt, lms_id).action)
        rt.now.now += timedelta(seconds=120)  # type: ignore[attr-defined]
    # LMS: two attempts on scripted_a, then scripted_b
    assert actions == ["retry", "failover", "sent"]
    assert calls_to("scripted_a") == [lms_id, lms_id] and calls_to("scripted_b") == [lms_id]


def test_provider_codes_match_whatever_their_letter_case() -> None:
    # Providers are not consistent about case: the operator's spelling need not match theirs
    solapi_busy = ProviderTransientError(
        "busy", provider="solapi", code=ErrorCode.PROVIDER_ERROR, provider_code="Vendor_Busy"
    )
    assert not classify(solapi_busy, policy(non_retryable_codes=["solapi:VENDOR_BUSY"])).retryable
    assert not classify(solapi_busy, policy(non_retryable_codes=["SOLAPI:vendor_busy"])).retryable
    waits = policy(retry_after={"by_code": {"Solapi:VENDOR_busy": 7}})
    assert classify(solapi_busy, waits).retry_after == 7
    # The same code twice in different cases is still both retryable and non-retryable
    with pytest.raises(ConfigurationError, match="both retryable and non-retryable"):
        policy(retryable_codes=["solapi:VENDOR_BUSY"], non_retryable_codes=["solapi:vendor_busy"])
