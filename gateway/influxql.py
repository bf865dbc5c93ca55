"""The InfluxQL subset Grafana's built-in InfluxDB data source sends: a tokenizer and a
recursive-descent parser into small statement objects. No I/O: what the statements mean for
fieldgate's series is gateway/influxql_executor.py's.

The subset (keywords in any case; `;` separates statements):

    SHOW MEASUREMENTS [WITH MEASUREMENT =~ /re/ | = name] [WHERE cond] [LIMIT n] [OFFSET n]
    SHOW TAG KEYS [ON db] [FROM source] [WHERE cond] [LIMIT n] [OFFSET n]
    SHOW TAG VALUES [ON db] [FROM source] WITH KEY =|!=|=~|!~ "k"|/re/ | IN ("k", ...)
        [WHERE cond] [LIMIT n] [OFFSET n]
    SHOW FIELD KEYS [ON db] [FROM source] [LIMIT n] [OFFSET n]
    SHOW RETENTION POLICIES [ON db];  SHOW DATABASES
    SELECT agg("field") [AS "alias"] [, ...] FROM source
        WHERE [tag conditions AND] time >= t [AND time <= t]
        GROUP BY time(interval)[, "device" | *] [fill(none|null|previous|linear|number)]
        [ORDER BY time ASC] [tz('Europe/Oslo')]

`source` is `"measurement"`, `"rp"."measurement"`, `"db"."rp"."measurement"` or `/regex/`;
`agg` is mean, min, max, sum, count, first, last or stddev; a time `t` is `now()` [+|- duration],
an RFC 3339 string, or an integer with a unit (`1700000000000ms`; bare integers are nanoseconds).
Tag conditions are `=`, `!=`, `<>`, `=~`, `!~` joined by AND/OR with parentheses. Regexes are
RE2's, as InfluxDB's (Go's regexp) are: the same syntax, and matching in linear time, so no
pattern a client sends can hold the event loop (Python's `re` backtracks: `/(a+)+$/` on a
64-character name would run for centuries).

Errors are `InfluxQLError`, worded like InfluxDB's own ("found X, expected Y at line 1, char N")
and followed by what this subset supports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol

import re2  # type: ignore[import-untyped]

_EPOCH_UNITS_NS: Final = {
    "ns": 1,
    "u": 1_000,
    "µ": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
    "d": 86_400_000_000_000,
    "w": 604_800_000_000_000,
}

SUPPORTED: Final = (
    "fieldgate answers this InfluxQL subset: SHOW MEASUREMENTS, SHOW TAG KEYS, "
    'SHOW TAG VALUES WITH KEY = "device", SHOW FIELD KEYS, SHOW RETENTION POLICIES, '
    'SHOW DATABASES, and SELECT mean|min|max|sum|count|first|last|stddev("field") FROM '
    '"measurement" WHERE ["device" conditions AND] time >= ... [AND time <= ...] '
    'GROUP BY time(<interval>)[, "device"] [fill(none|null|previous|linear|<number>)]'
)

# The pseudo-tag a SHOW TAG VALUES ... WITH KEY condition tests: the key's name.
TAG_KEY: Final = "_tagKey"

AGGREGATES: Final = ("mean", "min", "max", "sum", "count", "first", "last", "stddev")


class InfluxQLError(Exception):
    """A query outside the subset, or not InfluxQL at all; the message says which."""


class Regex(Protocol):
    """A compiled RE2 pattern (google-re2 carries no types)."""

    def search(self, text: str) -> Any: ...


# Tokens


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # IDENT, QIDENT, STRING, NUMBER, DURATION, REGEX, OP, EOF
    text: str  # the identifier, string or regex unquoted; the number or operator as written
    pos: int  # offset in the query (0-based)


_IDENT_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER_RE: Final = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_DURATION_RE: Final = re.compile(r"(?:\d+(?:ns|ms|u|µ|s|m|h|d|w))+")
_OPS: Final = ("=~", "!~", "!=", "<>", "<=", ">=", "::", "=", "<", ">", "+", "-", "*", "/")
_PUNCT: Final = "(),;."
# Tokens after which a `/` opens a regex rather than dividing.
_REGEX_AFTER: Final = {"=~", "!~", "FROM", ","}


def tokenize(text: str) -> list[Token]:
    """The tokens of `text`, ending with an EOF token."""
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if text.startswith("--", i):  # a comment to the end of the line
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if c in "\"'":
            value, i2 = _quoted(text, i)
            tokens.append(Token("QIDENT" if c == '"' else "STRING", value, i))
            i = i2
            continue
        if c == "/" and _opens_regex(tokens):
            value, i2 = _regex(text, i)
            tokens.append(Token("REGEX", value, i))
            i = i2
            continue
        if c.isdigit():
            m = _DURATION_RE.match(text, i)
            if m is not None and not _IDENT_RE.match(text, m.end()):
                tokens.append(Token("DURATION", m.group(), i))
                i = m.end()
                continue
            m = _NUMBER_RE.match(text, i)
            assert m is not None  # a digit starts a number
            tokens.append(Token("NUMBER", m.group(), i))
            i = m.end()
            continue
        if c == "." and i + 1 < n and text[i + 1].isdigit():
            m = _NUMBER_RE.match("0" + text[i:])
            assert m is not None
            tokens.append(Token("NUMBER", m.group(), i))
            i += len(m.group()) - 1
            continue
        m = _IDENT_RE.match(text, i)
        if m is not None:
            tokens.append(Token("IDENT", m.group(), i))
            i = m.end()
            continue
        op = next((o for o in _OPS if text.startswith(o, i)), None)
        if op is not None:
            tokens.append(Token("OP", op, i))
            i += len(op)
            continue
        if c in _PUNCT:
            tokens.append(Token("OP", c, i))
            i += 1
            continue
        raise InfluxQLError(f"found {c}, expected a token at {_where(text, i)}")
    tokens.append(Token("EOF", "", n))
    return tokens


def _opens_regex(tokens: list[Token]) -> bool:
    if not tokens:
        return False
    last = tokens[-1]
    key = last.text.upper() if last.kind == "IDENT" else last.text if last.kind == "OP" else ""
    return key in _REGEX_AFTER


def _quoted(text: str, start: int) -> tuple[str, int]:
    """A '...' or "..." literal at `start` (backslash escapes) -> (its value, the index after)."""
    quote = text[start]
    out: list[str] = []
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
            i += 2
            continue
        if c == quote:
            return "".join(out), i + 1
        if c == "\n":
            break
        out.append(c)
        i += 1
    kind = "string" if quote == "'" else "quoted identifier"
    raise InfluxQLError(f"unterminated {kind} at {_where(text, start)}")


def _regex(text: str, start: int) -> tuple[str, int]:
    out: list[str] = []
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] == "/":
            out.append("/")
            i += 2
            continue
        if c == "/":
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise InfluxQLError(f"unterminated regex at {_where(text, start)}")


def _where(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"line {line}, char {col}"


# Statements


@dataclass(frozen=True, slots=True)
class Source:
    """A FROM source: a measurement name, or a regex over measurement names."""

    name: str | None = None
    regex: Regex | None = None

    def matches(self, measurement: str) -> bool:
        if self.regex is not None:
            return self.regex.search(measurement) is not None
        return measurement == self.name


@dataclass(frozen=True, slots=True)
class TagCompare:
    """`"key" op value`: op is =, !=, =~ or !~; `pattern` is set for the regex ops."""

    key: str
    op: str
    value: str
    pattern: Regex | None = None

    def holds(self, tags: dict[str, str]) -> bool:
        """InfluxDB's rule: a tag a series does not have compares as the empty string."""
        actual = tags.get(self.key, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        assert self.pattern is not None
        found = self.pattern.search(actual) is not None
        return found if self.op == "=~" else not found


@dataclass(frozen=True, slots=True)
class BoolOp:
    op: Literal["AND", "OR"]
    left: Cond
    right: Cond

    def holds(self, tags: dict[str, str]) -> bool:
        if self.op == "AND":
            return self.left.holds(tags) and self.right.holds(tags)
        return self.left.holds(tags) or self.right.holds(tags)


Cond = TagCompare | BoolOp


@dataclass(frozen=True, slots=True)
class TimeBound:
    """`time op t`; `ns` is t in epoch nanoseconds, or None with `now_offset_ns` for
    `now() [+|- d]`."""

    op: str  # >=, >, <=, <, =
    ns: int | None
    now_offset_ns: int = 0

    def at(self, now_ns: int) -> int:
        return self.ns if self.ns is not None else now_ns + self.now_offset_ns


@dataclass(slots=True)
class ShowMeasurements:
    name_filter: Source | None = None
    where: Cond | None = None
    limit: int | None = None
    offset: int = 0


@dataclass(slots=True)
class ShowTagKeys:
    source: Source | None = None
    where: Cond | None = None
    limit: int | None = None
    offset: int = 0


@dataclass(slots=True)
class ShowTagValues:
    key: Cond  # which tag keys, as a condition on TAG_KEY
    source: Source | None = None
    where: Cond | None = None
    limit: int | None = None
    offset: int = 0


@dataclass(slots=True)
class ShowFieldKeys:
    source: Source | None = None
    limit: int | None = None
    offset: int = 0


@dataclass(slots=True)
class ShowRetentionPolicies:
    pass


@dataclass(slots=True)
class ShowDatabases:
    pass


@dataclass(frozen=True, slots=True)
class Selector:
    agg: str  # one of AGGREGATES
    field: str
    alias: str | None = None


@dataclass(slots=True)
class Select:
    selectors: list[Selector]
    source: Source
    interval_ns: int
    where: Cond | None = None
    times: list[TimeBound] = field(default_factory=list)
    group_by_device: bool = False
    fill: str | float = "null"  # none, null, previous, linear, or a number
    tz: str | None = None  # tz('Europe/Oslo'): whole-day buckets start at its midnight


Statement = (
    ShowMeasurements
    | ShowTagKeys
    | ShowTagValues
    | ShowFieldKeys
    | ShowRetentionPolicies
    | ShowDatabases
    | Select
)


def parse(text: str) -> list[Statement]:
    """The statements of `text`; InfluxQLError for anything outside the subset."""
    return _Parser(text).statements()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0

    # -- token helpers

    def peek(self, ahead: int = 0) -> Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def next(self) -> Token:
        tok = self.peek()
        self.i += 1
        return tok

    def is_kw(self, *words: str, ahead: int = 0) -> bool:
        tok = self.peek(ahead)
        return tok.kind == "IDENT" and tok.text.upper() in words

    def is_op(self, *ops: str) -> bool:
        tok = self.peek()
        return tok.kind == "OP" and tok.text in ops

    def fail(self, expected: str, tok: Token | None = None) -> InfluxQLError:
        tok = tok or self.peek()
        found = "EOF" if tok.kind == "EOF" else tok.text or tok.kind
        if tok.kind == "STRING":
            found = f"'{tok.text}'"
        return InfluxQLError(f"found {found}, expected {expected} at {_where(self.text, tok.pos)}")

    def kw(self, *words: str) -> str:
        if not self.is_kw(*words):
            raise self.fail(" or ".join(words))
        return self.next().text.upper()

    def op(self, *ops: str) -> str:
        if not self.is_op(*ops):
            raise self.fail(", ".join(ops))
        return self.next().text

    def ident(self, what: str = "identifier") -> str:
        tok = self.peek()
        if tok.kind in ("IDENT", "QIDENT"):
            self.i += 1
            return tok.text
        raise self.fail(what)

    def integer(self) -> int:
        tok = self.peek()
        if tok.kind == "NUMBER" and tok.text.isdigit():
            self.i += 1
            return int(tok.text)
        raise self.fail("integer")

    # -- statements

    def statements(self) -> list[Statement]:
        out: list[Statement] = []
        while True:
            while self.is_op(";"):
                self.next()
            if self.peek().kind == "EOF":
                break
            out.append(self.statement())
            if not self.is_op(";") and self.peek().kind != "EOF":
                raise self.fail("; or EOF")
        if not out:
            raise InfluxQLError("empty query")
        return out

    def statement(self) -> Statement:
        if self.is_kw("SELECT"):
            return self.select()
        if self.is_kw("SHOW"):
            self.next()
            if self.is_kw("MEASUREMENTS"):
                self.next()
                return self.show_measurements()
            if self.is_kw("TAG"):
                self.next()
                which = self.kw("KEYS", "VALUES")
                return self.show_tag_keys() if which == "KEYS" else self.show_tag_values()
            if self.is_kw("FIELD"):
                self.next()
                self.kw("KEYS")
                return self.show_field_keys()
            if self.is_kw("RETENTION"):
                self.next()
                self.kw("POLICIES")
                self.on_db()
                return ShowRetentionPolicies()
            if self.is_kw("DATABASES"):
                self.next()
                return ShowDatabases()
            raise self.fail("MEASUREMENTS, TAG KEYS, TAG VALUES, FIELD KEYS, RETENTION POLICIES")
        raise self.fail("SELECT or SHOW")

    def on_db(self) -> None:
        if self.is_kw("ON"):
            self.next()
            self.ident("database name")

    def limit_offset(self) -> tuple[int | None, int]:
        limit, offset = None, 0
        if self.is_kw("LIMIT"):
            self.next()
            limit = self.integer()
        if self.is_kw("OFFSET"):
            self.next()
            offset = self.integer()
        return limit, offset

    def from_source(self) -> Source | None:
        if not self.is_kw("FROM"):
            return None
        self.next()
        return self.source()

    def source(self) -> Source:
        tok = self.peek()
        if tok.kind == "REGEX":
            self.next()
            return Source(regex=_compile(tok.text))
        parts = [self.ident("measurement")]
        while self.is_op("."):  # "db"."rp"."m": the last part is the measurement
            self.next()
            parts.append(self.ident("measurement"))
        if len(parts) > 3:
            raise self.fail("at most db.rp.measurement")
        if self.is_op(","):
            raise self.fail("one measurement (fieldgate reads one source a statement)")
        return Source(name=parts[-1])

    def show_measurements(self) -> ShowMeasurements:
        st = ShowMeasurements()
        self.on_db()
        if self.is_kw("WITH"):
            self.next()
            self.kw("MEASUREMENT")
            op = self.op("=~", "=")
            if op == "=~":
                tok = self.peek()
                if tok.kind != "REGEX":
                    raise self.fail("regex")
                self.next()
                st.name_filter = Source(regex=_compile(tok.text))
            else:
                st.name_filter = Source(name=self.ident("measurement"))
        st.where = self.tag_where()
        st.limit, st.offset = self.limit_offset()
        return st

    def show_tag_keys(self) -> ShowTagKeys:
        self.on_db()
        st = ShowTagKeys(source=self.from_source())
        st.where = self.tag_where()
        st.limit, st.offset = self.limit_offset()
        return st

    def show_tag_values(self) -> ShowTagValues:
        self.on_db()
        source = self.from_source()
        self.kw("WITH")
        self.kw("KEY")
        key: Cond
        if self.is_kw("IN"):
            self.next()
            self.op("(")
            key = TagCompare(TAG_KEY, "=", self.ident("tag key"))
            while self.is_op(","):
                self.next()
                key = BoolOp("OR", key, TagCompare(TAG_KEY, "=", self.ident("tag key")))
            self.op(")")
        else:
            op = self.op("=", "!=", "<>", "=~", "!~")
            if op in ("=~", "!~"):
                tok = self.next()
                if tok.kind != "REGEX":
                    raise self.fail("regex", tok)
                key = TagCompare(TAG_KEY, op, tok.text, _compile(tok.text))
            else:
                key = TagCompare(TAG_KEY, "!=" if op == "<>" else op, self.ident("tag key"))
        st = ShowTagValues(key=key, source=source)
        st.where = self.tag_where()
        st.limit, st.offset = self.limit_offset()
        return st

    def show_field_keys(self) -> ShowFieldKeys:
        self.on_db()
        st = ShowFieldKeys(source=self.from_source())
        st.limit, st.offset = self.limit_offset()
        return st

    def tag_where(self) -> Cond | None:
        if not self.is_kw("WHERE"):
            return None
        self.next()
        cond, times = self.condition()
        if times:
            raise InfluxQLError("time conditions are not supported in SHOW statements")
        return cond

    # -- SELECT

    def select(self) -> Select:
        self.kw("SELECT")
        selectors = [self.selector()]
        while self.is_op(","):
            self.next()
            selectors.append(self.selector())
        self.kw("FROM")
        source = self.source()
        if source.regex is not None:
            raise InfluxQLError(
                "SELECT from a regex of measurements is not supported: name one measurement"
            )
        where: Cond | None = None
        times: list[TimeBound] = []
        if self.is_kw("WHERE"):
            self.next()
            where, times = self.condition()
        interval_ns, by_device, fill = self.group_by()
        if self.is_kw("ORDER"):
            self.next()
            self.kw("BY")
            if self.ident("time").lower() != "time":
                raise InfluxQLError("ORDER BY supports time only")
            if self.is_kw("DESC"):
                raise InfluxQLError("ORDER BY time DESC is not supported: use ASC")
            if self.is_kw("ASC"):
                self.next()
        if self.is_kw("LIMIT", "SLIMIT", "OFFSET", "SOFFSET"):
            raise InfluxQLError(f"{self.peek().text.upper()} is not supported in SELECT")
        tz: str | None = None
        if self.is_kw("TZ"):
            self.next()
            self.op("(")
            tok = self.next()
            if tok.kind != "STRING":
                raise self.fail("string", tok)
            tz = tok.text
            self.op(")")
        return Select(selectors, source, interval_ns, where, times, by_device, fill, tz)

    def selector(self) -> Selector:
        tok = self.peek()
        if tok.kind != "IDENT" or not self.is_op_at(1, "("):
            if (tok.kind == "OP" and tok.text == "*") or tok.kind in ("IDENT", "QIDENT"):
                raise InfluxQLError(
                    "raw SELECT of fields is not supported: select an aggregate like "
                    'mean("value") with GROUP BY time(...)'
                )
            raise self.fail("aggregate function")
        name = self.next().text.lower()
        if name not in AGGREGATES:
            raise InfluxQLError(
                f"function {name}() is not supported; use one of: {', '.join(AGGREGATES)}"
            )
        self.op("(")
        if self.is_op("*"):
            raise InfluxQLError(f'{name}(*) is not supported: name a field, e.g. {name}("value")')
        fname = self.ident("field key")
        if self.is_op("::"):
            self.next()
            if self.ident("field").lower() != "field":
                raise InfluxQLError(f"{name}() takes a field, not a tag")
        self.op(")")
        if not self.is_op(",") and not self.is_kw("FROM", "AS"):
            tok = self.peek()
            raise InfluxQLError(
                f'found {tok.text or tok.kind} after {name}("{fname}"): math on selectors is '
                "not supported"
            )
        alias = None
        if self.is_kw("AS"):
            self.next()
            alias = self.ident("alias")
        return Selector(name, fname, alias)

    def is_op_at(self, ahead: int, op: str) -> bool:
        tok = self.peek(ahead)
        return tok.kind == "OP" and tok.text == op

    def group_by(self) -> tuple[int, bool, str | float]:
        if not self.is_kw("GROUP"):
            raise InfluxQLError(
                "a SELECT needs GROUP BY time(<interval>): fieldgate answers aggregates in time "
                "buckets"
            )
        self.next()
        self.kw("BY")
        interval_ns: int | None = None
        by_device = False
        while True:
            if self.is_kw("TIME") and self.is_op_at(1, "("):
                self.next()
                self.op("(")
                tok = self.next()
                if tok.kind != "DURATION":
                    raise self.fail("duration like 10s", tok)
                interval_ns = _duration_ns(tok.text)
                if self.is_op(","):
                    raise InfluxQLError("GROUP BY time() with an offset is not supported")
                self.op(")")
            elif self.is_op("*"):
                self.next()
                by_device = True
            else:
                tok = self.peek()
                key = self.ident('time(<interval>) or "device"')
                if self.is_op("::"):
                    self.next()
                    self.ident("tag")
                if key != "device":
                    raise InfluxQLError(
                        f'GROUP BY "{key}" is not supported: fieldgate\'s one tag is "device" '
                        f"(at {_where(self.text, tok.pos)})"
                    )
                by_device = True
            if not self.is_op(","):
                break
            self.next()
        if interval_ns is None:
            raise InfluxQLError("GROUP BY needs time(<interval>), e.g. GROUP BY time(1m)")
        fill: str | float = "null"
        if self.is_kw("FILL"):
            self.next()
            self.op("(")
            tok = self.next()
            negative = False
            if tok.kind == "OP" and tok.text == "-":
                negative, tok = True, self.next()
            if tok.kind == "NUMBER":
                fill = -float(tok.text) if negative else float(tok.text)
            elif tok.kind == "IDENT" and tok.text.lower() in ("none", "null", "previous", "linear"):
                fill = tok.text.lower()
            else:
                raise self.fail("none, null, previous, linear or a number", tok)
            self.op(")")
        return interval_ns, by_device, fill

    # -- WHERE: tag conditions and time bounds

    def condition(self) -> tuple[Cond | None, list[TimeBound]]:
        """A WHERE expression, split into its tag condition and its time bounds. Time bounds
        must be joined to the rest by AND at the top (as Grafana writes them)."""
        times: list[TimeBound] = []
        cond = self.or_expr(times, top=True)
        return cond, times

    def or_expr(self, times: list[TimeBound], top: bool) -> Cond | None:
        left = self.and_expr(times, top)
        while self.is_kw("OR"):
            self.next()
            right = self.and_expr(times, top=False)
            if left is None or right is None:
                raise InfluxQLError("time conditions may not be joined by OR")
            left = BoolOp("OR", left, right)
        return left

    def and_expr(self, times: list[TimeBound], top: bool) -> Cond | None:
        left = self.unary(times, top)
        while self.is_kw("AND"):
            self.next()
            right = self.unary(times, top)
            if left is None:
                left = right
            elif right is not None:
                left = BoolOp("AND", left, right)
        return left

    def unary(self, times: list[TimeBound], top: bool) -> Cond | None:
        if self.is_op("("):
            self.next()
            inner = self.or_expr(times, top)
            self.op(")")
            return inner
        tok = self.peek()
        key = self.ident("tag key or time")
        if tok.kind == "IDENT" and key.lower() == "time":
            if not top:
                raise InfluxQLError(
                    f"time conditions must be ANDed at the top of WHERE "
                    f"(at {_where(self.text, tok.pos)})"
                )
            times.append(self.time_bound())
            return None
        if self.is_op("::"):
            self.next()
            cast = self.ident("tag").lower()
            if cast == "field":
                raise InfluxQLError(
                    f'conditions on field "{key}" are not supported; WHERE takes "device" '
                    "conditions and time bounds"
                )
        op = self.op("=", "!=", "<>", "=~", "!~", "<", ">", "<=", ">=")
        if op in ("<", ">", "<=", ">="):
            raise InfluxQLError(
                f'"{key}" {op} ... is not supported: WHERE compares tags with =, !=, =~, !~'
            )
        value = self.next()
        if op in ("=~", "!~"):
            if value.kind != "REGEX":
                raise self.fail("regex", value)
            return TagCompare(key, op, value.text, _compile(value.text))
        if value.kind not in ("STRING", "NUMBER"):
            raise self.fail("string", value)
        return TagCompare(key, "!=" if op == "<>" else op, value.text)

    def time_bound(self) -> TimeBound:
        op = self.op(">=", ">", "<=", "<", "=")
        tok = self.peek()
        if self.is_kw("NOW"):
            self.next()
            self.op("(")
            self.op(")")
            offset = 0
            while self.is_op("+", "-"):
                sign = -1 if self.next().text == "-" else 1
                d = self.next()
                if d.kind != "DURATION":
                    raise self.fail("duration", d)
                offset += sign * _duration_ns(d.text)
            return TimeBound(op, None, offset)
        self.next()
        if tok.kind == "STRING":
            return TimeBound(op, _rfc3339_ns(tok.text, self.text, tok.pos))
        if tok.kind == "DURATION":  # 1700000000000ms: an epoch time with a unit
            return TimeBound(op, _duration_ns(tok.text))
        if tok.kind == "NUMBER" and tok.text.isdigit():  # bare integers are nanoseconds
            return TimeBound(op, int(tok.text))
        raise self.fail("now(), an RFC 3339 string or an epoch time like 1700000000000ms", tok)


def _duration_ns(text: str) -> int:
    total = 0
    for n, unit in re.findall(r"(\d+)(ns|ms|u|µ|s|m|h|d|w)", text):
        total += int(n) * _EPOCH_UNITS_NS[unit]
    return total


def _rfc3339_ns(text: str, query: str, pos: int) -> int:
    value = text.strip()
    frac_ns = 0
    m = re.match(r"^(.*T\d\d:\d\d:\d\d)\.(\d{1,9})(.*)$", value)
    if m is not None:  # Python parses at most microseconds: keep the nanoseconds aside
        value = m.group(1) + m.group(3)
        frac_ns = int(m.group(2).ljust(9, "0"))
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00") if "T" in value else value)
    except ValueError:
        raise InfluxQLError(f"'{text}' is not an RFC 3339 time at {_where(query, pos)}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1_000_000_000 + frac_ns


_RE2_OPTIONS: Final = re2.Options()
_RE2_OPTIONS.log_errors = False  # a client's bad pattern is its error, not a line in our log


def _compile(pattern: str) -> Regex:
    try:
        compiled: Regex = re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else ""
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise InfluxQLError(f"invalid regex /{pattern}/: {reason}") from None
    return compiled
