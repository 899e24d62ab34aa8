"""The policy file: who may read which name, and clear errors for files that cannot be used."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from vault_edge.agent import policy as policy_mod
from vault_edge.agent.peercred import Caller
from vault_edge.agent.policy import Policy, PolicyError, new_token, token_sha256

OWNER = Caller(pid=10, uid=1000, gid=1000)
ROOT = Caller(pid=11, uid=0, gid=0)
OTHER = Caller(pid=12, uid=1001, gid=1001)


def load(tmp_path: Path, text: str) -> Policy:
    f = tmp_path / "policy.toml"
    f.write_text(text)
    return Policy.load(f)


def test_no_file_allows_the_owner_and_root_only() -> None:
    p = Policy(None, owner_uid=1000)
    assert p.allows(OWNER, None, "db/main")
    assert p.allows(ROOT, None, "anything/at/all")
    assert not p.allows(OTHER, None, "db/main")
    assert not p.allows(OWNER, "some-token", "db/main")  # no rule names any token
    assert not p.knows_token("some-token")


def test_load_none_is_the_default_for_this_process() -> None:
    p = Policy.load(None)
    assert p.rules is None
    assert p.allows(Caller(1, os.getuid(), os.getgid()), None, "x")


def test_uid_gid_and_patterns(tmp_path: Path) -> None:
    p = load(
        tmp_path,
        """
        [[rule]]
        uid = 1000
        secrets = ["db/*", "openai"]

        [[rule]]
        gid = 2000
        secrets = ["shared/?x", "lit[ae]ral"]

        [[rule]]
        uid = 1001
        gid = 1001
        secrets = ["*"]
    """,
    )
    assert p.allows(OWNER, None, "db/main")
    assert p.allows(OWNER, None, "db/deep/nested")  # "*" crosses "/"
    assert p.allows(OWNER, None, "openai")
    assert not p.allows(OWNER, None, "db")  # "db/*" needs something after the slash
    assert not p.allows(OWNER, None, "DB/main")  # case-sensitive
    assert not p.allows(OWNER, None, "openai2")
    grp = Caller(1, 5000, 2000)
    assert p.allows(grp, None, "shared/ax") and not p.allows(grp, None, "shared/abx")
    assert p.allows(grp, None, "literal") and p.allows(grp, None, "litaral")
    assert not p.allows(grp, None, "litxral")
    assert p.allows(OTHER, None, "anything")
    assert not p.allows(Caller(1, 1001, 7), None, "anything")  # all conditions of a rule must match
    assert not p.allows(ROOT, None, "db/main")  # a policy file gives root nothing it does not name


def test_exe_rules(tmp_path: Path) -> None:
    real = tmp_path / "bin" / "worker-1.2"
    real.parent.mkdir()
    real.write_text("")
    link = tmp_path / "bin" / "worker"
    link.symlink_to(real)
    p = load(tmp_path, f'[[rule]]\nexe = "{link}"\nuid = 1000\nsecrets = ["*"]\n')
    assert p.uses_exe
    assert p.rules is not None and p.rules[0].exe == str(real)  # resolved as the kernel reports it
    assert p.allows(Caller(1, 1000, 1000, str(real)), None, "x")
    assert not p.allows(Caller(1, 1000, 1000, "/usr/bin/python3"), None, "x")
    assert not p.allows(Caller(1, 1000, 1000, None), None, "x")  # unknown exe never matches
    assert not p.allows(Caller(1, 1001, 1000, str(real)), None, "x")


def test_tokens(tmp_path: Path) -> None:
    tok_a, sha_a = new_token()
    tok_b, sha_b = new_token()
    p = load(
        tmp_path,
        f"""
        [[rule]]
        uid = 1000
        secrets = ["*"]

        [[rule]]
        token_sha256 = "{sha_a}"
        secrets = ["tenant-a/*"]

        [[rule]]
        token_sha256 = "{sha_b.upper()}"
        uid = 1000
        secrets = ["tenant-b/*"]
    """,
    )
    assert p.allows(OWNER, tok_a, "tenant-a/key")
    assert not p.allows(OWNER, tok_a, "tenant-b/key")  # only the token's rules apply
    assert not p.allows(OWNER, tok_a, "db/main")
    assert p.allows(OTHER, tok_a, "tenant-a/key")  # a token rule without conditions: any caller holding it
    assert p.allows(OWNER, tok_b, "tenant-b/key")
    assert not p.allows(OTHER, tok_b, "tenant-b/key")  # its uid condition applies too
    assert not p.allows(OWNER, "unknown", "db/main")  # unknown token: refused, no fallback
    assert not p.allows(OWNER, "", "db/main")
    assert p.allows(OWNER, None, "db/main")
    assert p.allows(OWNER, None, "tenant-a/key")  # without a token the uid rule applies
    assert p.knows_token(tok_a) and p.knows_token(tok_b) and not p.knows_token("unknown")


def test_new_token() -> None:
    token, digest = new_token()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
    assert digest == hashlib.sha256(token.encode()).hexdigest() == token_sha256(token)
    assert new_token()[0] != token


def test_decisions_are_memoised_and_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = load(tmp_path, '[[rule]]\nuid = 1000\nsecrets = ["a/*"]\n')
    calls = 0
    decide = p._decide

    def counting(*args: object) -> bool:
        nonlocal calls
        calls += 1
        return decide(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(p, "_decide", counting)
    for _ in range(5):
        assert p.allows(OWNER, None, "a/b")
    assert calls == 1
    assert not p.allows(Caller(99, 1000, 1000, "/bin/x"), None, "b")  # identity is part of the key
    monkeypatch.setattr(policy_mod, "_MEMO_MAX", 10)
    for i in range(100):
        p.allows(OWNER, None, f"a/{i}")
    assert len(p._memo) <= 10


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[[rule]]\nuid = 1\n", "'secrets' must be a non-empty list"),
        ("[[rule]]\nuid = 1\nsecrets = []\n", "'secrets' must be a non-empty list"),
        ('[[rule]]\nuid = 1\nsecrets = "db/*"\n', "'secrets' must be a non-empty list"),
        ("[[rule]]\nuid = 1\nsecrets = [1]\n", "non-empty string"),
        ('[[rule]]\nuid = 1\nsecrets = [""]\n', "non-empty string"),
        ('[[rule]]\nuid = "1000"\nsecrets = ["*"]\n', "'uid' must be an integer"),
        ('[[rule]]\nuid = true\nsecrets = ["*"]\n', "'uid' must be an integer"),
        ('[[rule]]\ngid = -1\nsecrets = ["*"]\n', "'gid' must be an integer"),
        ('[[rule]]\nexe = "python3"\nsecrets = ["*"]\n', "absolute path"),
        ('[[rule]]\nexe = 3\nsecrets = ["*"]\n', "'exe' must be a string"),
        ('[[rule]]\ntoken_sha256 = "abc"\nsecrets = ["*"]\n', "64 hex digits"),
        ('[[rule]]\nsecrets = ["*"]\n', "at least one condition"),
        ('[[rule]]\nuid = 1\nsecret = ["*"]\n', "unknown key(s) secret"),
        ('[[rules]]\nuid = 1\nsecrets = ["*"]\n', "unknown top-level key(s) rules"),
        ("rule = 3\n", "array of tables"),
        ("[[rule]\nuid = 1\n", "not valid TOML"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(PolicyError) as info:
        load(tmp_path, text)
    msg = str(info.value)
    assert msg.startswith(f"policy {tmp_path / 'policy.toml'}: ")
    assert fragment in msg
    if "rule" in text and "TOML" not in fragment and "top-level" not in fragment and "array" not in fragment:
        assert "rule 1" in msg


def test_the_failing_rule_is_numbered(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="rule 2: 'exe' must be an absolute path"):
        load(tmp_path, '[[rule]]\nuid = 1\nsecrets = ["*"]\n[[rule]]\nexe = "x"\nsecrets = ["*"]\n')


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"cannot read it: No such file"):
        Policy.load(tmp_path / "absent.toml")


def test_an_empty_file_allows_nobody(tmp_path: Path) -> None:
    p = load(tmp_path, "")
    assert p.rules == ()
    assert not p.allows(OWNER, None, "x") and not p.allows(ROOT, None, "x")


def test_repr_shows_no_token_digest(tmp_path: Path) -> None:
    _, sha = new_token()
    p = load(tmp_path, f'[[rule]]\ntoken_sha256 = "{sha}"\nsecrets = ["*"]\n')
    assert sha not in repr(p)


def test_the_memo_is_keyed_by_token_digest_and_bounded_in_bytes(tmp_path: Path) -> None:
    """A caller sending many distinct long tokens (all refused) cannot grow the memo past its bounds,
    and no raw token is kept in it."""
    import tracemalloc

    p = load(tmp_path, f'[[rule]]\ntoken_sha256 = "{"ab" * 32}"\nsecrets = ["a/*"]\n')
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(6000):
            assert not p.allows(OWNER, f"{i:08d}" + "t" * 8000, "a/b")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    print(
        f"\n[policy memo] 6,000 distinct 8 KB tokens: memo {len(p._memo)} entries, {p.memo_bytes} bytes "
        f"accounted; traced growth {grown / 2**20:.1f} MiB"
    )
    assert p.memo_bytes <= policy_mod._MEMO_BYTES
    assert grown < 8 << 20  # raw tokens kept would be 48 MB
    assert all(not (isinstance(part, str) and "tttt" in part) for key in p._memo for part in key)


def test_the_memo_byte_bound_holds_for_long_names_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy_mod, "_MEMO_BYTES", 50_000)
    p = load(tmp_path, '[[rule]]\nuid = 1000\nsecrets = ["a/*"]\n')
    caller = Caller(1, 1000, 1000, "/x" * 2000)
    for i in range(500):
        p.allows(caller, None, f"a/{i:04d}" + "n" * 200)
        assert p.memo_bytes <= 50_000
    assert p.allows(caller, None, "a/b") and not p.allows(caller, None, "b")


def test_exe_only_rules_are_named_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`exe` is advisory (read once per connection; a forked child can exec the allowed binary on a
    connection its parent opened): a rule relying on it alone is warned about at start."""
    from vault_edge.agent.run import warn_about_policy

    p = load(
        tmp_path,
        '[[rule]]\nexe = "/usr/bin/env"\nsecrets = ["a/*"]\n\n'
        '[[rule]]\nuid = 1000\nexe = "/usr/bin/env"\nsecrets = ["b/*"]\n\n'
        '[[rule]]\nuid = 1000\nsecrets = ["c/*"]\n',
    )
    assert p.exe_only_rules == (1,)
    with caplog.at_level("WARNING", logger="vault_edge.agent"):
        warn_about_policy(p)
    exe_warnings = [r.getMessage() for r in caplog.records if "advisory" in r.getMessage()]
    assert len(exe_warnings) == 1 and "rule 1" in exe_warnings[0] and "rule 2" not in exe_warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="vault_edge.agent"):
        warn_about_policy(load(tmp_path, '[[rule]]\nuid = 1000\nsecrets = ["c/*"]\n'))
    assert not [r for r in caplog.records if "advisory" in r.getMessage()]
