"""Event routing by index: which call handles an event is looked up, never scanned for.

Each call registers the objects it cares about (its channel, its agents' channels, the bridges
it is in, its playbacks and snoop channels) under a key such as ``channel:<id>``; an event is
delivered once to every call registered under any key it names.  A call is removed by
identity, so a second gate on the same channel (a new call object) is never dropped by the
cleanup of the first.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol


class EventHandler(Protocol):
    def deliver(self, event: dict[str, Any]) -> None: ...


def sub_object(value: Any) -> dict[str, Any]:
    """A sub-object of an event, or {} when a malformed frame put something else there."""
    return value if isinstance(value, dict) else {}


def event_channel(event: dict[str, Any]) -> str | None:
    """The id of the channel an event is about, or None (absent or malformed)."""
    channel_id = sub_object(event.get("channel")).get("id")
    return channel_id if isinstance(channel_id, str) and channel_id else None


def event_keys(event: dict[str, Any]) -> Iterator[str]:
    """The routing keys an ARI event names: its channel, bridge, playback and the playback's target."""
    channel_id = event_channel(event)
    if channel_id is not None:
        yield f"channel:{channel_id}"
    bridge_id = sub_object(event.get("bridge")).get("id")
    if isinstance(bridge_id, str) and bridge_id:
        yield f"bridge:{bridge_id}"
    playback = sub_object(event.get("playback"))
    playback_id = playback.get("id")
    if isinstance(playback_id, str) and playback_id:
        yield f"playback:{playback_id}"
    target = playback.get("target_uri")
    if isinstance(target, str) and target.startswith(("channel:", "bridge:")):
        yield target


class Router:
    def __init__(self) -> None:
        self._routes: dict[str, list[EventHandler]] = {}

    def add(self, key: str, handler: EventHandler) -> None:
        handlers = self._routes.setdefault(key, [])
        if not any(h is handler for h in handlers):
            handlers.append(handler)

    def remove(self, key: str, handler: EventHandler) -> None:
        handlers = self._routes.get(key)
        if handlers is None:
            return
        handlers[:] = [h for h in handlers if h is not handler]
        if not handlers:
            del self._routes[key]

    def remove_all(self, handler: EventHandler) -> None:
        for key in [k for k, handlers in self._routes.items() if any(h is handler for h in handlers)]:
            self.remove(key, handler)

    def handlers(self, key: str) -> list[EventHandler]:
        return list(self._routes.get(key, ()))

    def others(self, key: str, handler: EventHandler) -> bool:
        """Whether a handler other than ``handler`` still routes ``key`` (e.g. keep a subscription)."""
        return any(h is not handler for h in self._routes.get(key, ()))

    def route(self, event: dict[str, Any]) -> int:
        """Deliver to each handler once; returns how many got it."""
        delivered: list[EventHandler] = []
        for key in event_keys(event):
            for handler in self._routes.get(key, ()):
                if not any(h is handler for h in delivered):
                    delivered.append(handler)
                    handler.deliver(event)
        return len(delivered)

    def __len__(self) -> int:
        return len(self._routes)
