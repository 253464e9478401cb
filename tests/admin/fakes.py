"""What the admin tests feed the metrics (a finished request, as the listener hands it over)
and a check of the HTML they get back (every element closed, in order)."""

from __future__ import annotations

from html.parser import HTMLParser

from attrs import define

from trackingproxy.server.exchange import Outcome


@define
class FakeRequest:
    """A finished request: its target, status, the domain it was for and its protocol."""

    uri: bytes
    code: int = 200
    host: str = "-"
    clientproto: bytes = b"HTTP/1.1"

    @property
    def outcome(self) -> Outcome:
        return Outcome(host=self.host)


VOID = frozenset(("meta", "input", "br", "img", "link", "hr", "col", "wbr"))


def unbalanced_tags(page: str) -> list[str]:
    """What is wrong with the nesting of ``page``'s elements (empty: every element that is
    opened is closed, in order; void elements need no end tag)."""
    problems: list[str] = []
    stack: list[str] = []

    class Checker(HTMLParser):
        def handle_starttag(self, tag: str, attrs: object) -> None:
            if tag not in VOID:
                stack.append(tag)

        def handle_endtag(self, tag: str) -> None:
            if not stack or stack[-1] != tag:
                problems.append(f"</{tag}> closes <{stack[-1] if stack else '-'}>")
            else:
                stack.pop()

    Checker().feed(page)
    return problems + [f"<{tag}> never closed" for tag in stack]
