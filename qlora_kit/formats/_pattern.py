"""PEFT's rank_pattern / alpha_pattern keys, matched without backtracking.

PEFT reads each key as a regular expression and picks, in dict order, the first key K for which
`(.*\\.)?(K)$` matches the module name from its start, i.e. K matches the whole name or the part after one
of its dots. Keys come from untrusted adapter_config.json files, so they are not handed to a backtracking
engine (`(.|.)*!` takes exponential time there). Instead each key is parsed into a small syntax tree and
run as a Thompson NFA: the set of live states advances one character at a time, so one key costs at most
len(name) * states steps, and every table carries a step budget on top.

Supported syntax (anything else is refused by name): literal characters, `.`, escaped punctuation,
`\\d \\D \\w \\W \\s \\S`, classes `[a-z0-9_]` / `[^...]`, groups `(...)` / `(?:...)`, alternation `|`, quantifiers
`* + ? {m} {m,} {m,n}` (a trailing lazy `?` is accepted: it cannot change a whole-name match), `^` as the first
and `$` as the last character.
"""
MAX_KEY_CHARS = 256
MAX_KEYS = 4096
MAX_STATES = 2048  # per key, after expanding {m,n}
MAX_REPEAT = 64
STEP_BUDGET = 4_000_000  # NFA state visits per table, all lookups together

_CLASSES = {"d": str.isdecimal, "w": lambda c: c.isalnum() or c == "_", "s": str.isspace}


class PatternError(ValueError):
    """A key outside the supported syntax or limits, or a table over its step budget."""


def _any(c):
    return c != "\n"


class _Parser:
    def __init__(self, key: str):
        self.s, self.i = key, 0

    def fail(self, why: str):
        raise PatternError(f"{why} at character {self.i}")

    def peek(self):
        return self.s[self.i] if self.i < len(self.s) else None

    def alt(self):
        branches = [self.cat()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.cat())
        return ("alt", branches) if len(branches) > 1 else branches[0]

    def cat(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            items.append(self.repeat())
        return ("cat", items)

    def repeat(self):
        node = self.atom()
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            node = ("rep", node, 0 if c != "+" else 1, 1 if c == "?" else None)
        elif c == "{":
            node = ("rep", node, *self.braces())
        else:
            return node
        if self.peek() == "?":  # lazy: same set of whole-name matches
            self.i += 1
        if self.peek() in ("*", "+", "?", "{"):
            self.fail("a quantifier on a quantifier")
        return node

    def braces(self):
        end = self.s.find("}", self.i)
        body = self.s[self.i + 1:end] if end > 0 else ""
        lo, sep, hi = body.partition(",")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            self.fail("'{' that is not a {m}, {m,} or {m,n} quantifier")
        m, n = int(lo), (int(hi) if hi else None) if sep else int(lo)
        if m > MAX_REPEAT or (n is not None and (n > MAX_REPEAT or n < m)):
            self.fail(f"a repeat count over {MAX_REPEAT} or with max < min")
        self.i = end + 1
        return m, n

    def escape(self):
        self.i += 1
        c = self.peek()
        if c is None:
            self.fail("a trailing backslash")
        self.i += 1
        if c.lower() in _CLASSES:
            f = _CLASSES[c.lower()]
            return f if c.islower() else (lambda x, f=f: not f(x))
        if c.isalnum():
            self.fail(f"the escape \\{c}")
        return lambda x, c=c: x == c

    def atom(self):
        c = self.peek()
        if c == "(":
            self.i += 1
            if self.s.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                self.fail("a group extension '(?'")
            node = self.alt()
            if self.peek() != ")":
                self.fail("an unclosed '('")
            self.i += 1
            return node
        if c == "[":
            return ("set", self.klass())
        if c == "\\":
            return ("set", self.escape())
        if c in ("*", "+", "?", "{", ")", "^", "$"):
            self.fail(f"{c!r} in this place")
        self.i += 1
        return ("set", _any if c == "." else (lambda x, c=c: x == c))

    def klass(self):
        self.i += 1
        negate = self.peek() == "^"
        self.i += negate
        preds, first = [], True
        while True:
            c = self.peek()
            if c is None:
                self.fail("an unclosed '['")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            if c == "\\":
                preds.append(self.escape())
                continue
            self.i += 1
            if self.peek() == "-" and self.i + 1 < len(self.s) and self.s[self.i + 1] != "]":
                hi = self.s[self.i + 1]
                if hi == "\\" or hi < c:
                    self.fail("a bad range in '[...]'")
                self.i += 2
                preds.append(lambda x, lo=c, hi=hi: lo <= x <= hi)
            else:
                preds.append(lambda x, c=c: x == c)
        return (lambda x: not any(p(x) for p in preds)) if negate else (lambda x: any(p(x) for p in preds))


class _Nfa:
    """States: ("c", predicate, next) consumes one char; ("s", a, b) splits; ("m",) accepts."""

    def __init__(self, tree):
        self.states = [("m",)]
        self.start = self.build(tree, 0)

    def new(self, state) -> int:
        if len(self.states) >= MAX_STATES:
            raise PatternError(f"more than {MAX_STATES} states once repeats are expanded")
        self.states.append(state)
        return len(self.states) - 1

    def build(self, node, nxt: int) -> int:
        kind = node[0]
        if kind == "set":
            return self.new(("c", node[1], nxt))
        if kind == "cat":
            for item in reversed(node[1]):
                nxt = self.build(item, nxt)
            return nxt
        if kind == "alt":
            starts = [self.build(b, nxt) for b in node[1]]
            s = starts[-1]
            for other in reversed(starts[:-1]):
                s = self.new(("s", other, s))
            return s
        _, body, m, n = node  # "rep"
        if n is None:
            loop = self.new(None)
            self.states[loop] = ("s", self.build(body, loop), nxt)
            cur = loop
        else:
            cur = nxt
            for _ in range(n - m):
                cur = self.new(("s", self.build(body, cur), nxt))
        for _ in range(m):
            cur = self.build(body, cur)
        return cur


class _Key:
    """One compiled key: a fixed-length literal fast path when it has no operators, else the NFA."""

    def __init__(self, key: str):
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
            raise PatternError(f"must be a non-empty string of at most {MAX_KEY_CHARS} characters")
        self.anchored = key.startswith("^")
        body = key[1:] if self.anchored else key
        body = body[:-1] if body.endswith("$") and not body.endswith("\\$") else body
        p = _Parser(body)
        tree = p.alt()
        if p.i != len(body):
            p.fail("an unmatched ')'")
        self.literal = self._literal(tree)
        self.nfa = None if self.literal is not None else _Nfa(tree)

    @staticmethod
    def _literal(tree):
        if tree[0] != "cat" or not all(n[0] == "set" for n in tree[1]):
            return None
        return [n[1] for n in tree[1]]

    def match(self, name: str, budget: list[int]) -> bool:
        starts = [0] if self.anchored else [0] + [i + 1 for i, c in enumerate(name) if c == "."]
        if self.literal is not None:
            s = len(name) - len(self.literal)
            budget[0] -= len(self.literal)
            return s in starts and all(p(c) for p, c in zip(self.literal, name[s:]))
        states, live = self.nfa.states, set()

        def add(i, into):
            stack = [i]
            while stack:
                j = stack.pop()
                if j in into:
                    continue
                into.add(j)
                budget[0] -= 1
                if states[j][0] == "s":
                    stack += [states[j][2], states[j][1]]

        starts = set(starts)
        for pos, ch in enumerate(name):
            if pos in starts:
                add(self.nfa.start, live)
            nxt = set()
            for j in live:
                st = states[j]
                if st[0] == "c" and st[1](ch):
                    add(st[2], nxt)
            live = nxt
            if budget[0] < 0:
                raise PatternError(f"over the budget of {STEP_BUDGET} matching steps")
        if len(name) in starts:
            add(self.nfa.start, live)
        return 0 in live


class PatternTable:
    """An ordered key -> value table looked up PEFT's way: the first key matching the module name wins.

    Args:
        table: the rank_pattern or alpha_pattern dict.

    Raises:
        PatternError naming the key and what is wrong with it.
    """

    def __init__(self, table: dict):
        if len(table) > MAX_KEYS:
            raise PatternError(f"{len(table)} keys; at most {MAX_KEYS}")
        self.keys = []
        for key, value in table.items():
            try:
                self.keys.append((_Key(key), value))
            except PatternError as e:
                raise PatternError(f"key {key!r}: {e}") from None
        self._budget = [STEP_BUDGET]

    def lookup(self, name: str, default):
        """The value of the first key that matches `name` (all of it, or the part after a dot), else `default`."""
        for key, value in self.keys:
            if key.match(name, self._budget):
                return value
            if self._budget[0] < 0:
                raise PatternError(f"over the budget of {STEP_BUDGET} matching steps (module {name})")
        return default


class FullMatch:
    """One pattern matched like Python's `re.fullmatch(pattern, name)` (PEFT's string target_modules and
    exclude_modules), on the same backtracking-free engine and syntax; each call has its own step budget.

    Raises:
        PatternError naming what is wrong with the pattern.
    """

    def __init__(self, pattern: str):
        self.pattern = pattern
        self._key = _Key(pattern)
        self._key.anchored = True  # only the match starting at character 0, ending at the end

    def __call__(self, name: str) -> bool:
        budget = [STEP_BUDGET]
        found = self._key.match(name, budget)
        if budget[0] < 0:
            raise PatternError(f"over the budget of {STEP_BUDGET} matching steps (module {name})")
        return found
