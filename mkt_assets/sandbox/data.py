"""Deterministic fake account for the sandbox API.

Everything is derived from ``seed`` and the requested sizes, so two ``SandboxData`` built with
the same arguments (and the same later mutations) serve byte-identical responses.

Contacts are the only resource that can be large (a million or more), so they are never held as
records: the account keeps a sorted ``array('q')`` of contact ids and builds each record on demand
from ``(seed, id)``. Serving a page therefore costs O(log n + page), whatever the account size.
The small resources (tags, communities, courses, contact fields) are plain lists of records.

Memberships (contact in a community) and enrollments (contact in a course) scale with contacts, so
they are not held either: each contact's 0-2 of each are a pure function of a cheap integer hash
of ``(seed, contact id)`` (never of the contact record), and their ids are
``4 * contact id + slot`` (memberships: slots 0-1, enrollments: 2-3), strictly increasing with
``(contact id, slot)`` and never shared between the two. On average a contact has 0.3
memberships and 0.4 enrollments (so 100k contacts: ~30k and ~40k). A page walks the live contact
ids from the cursor's contact on, so it also costs O(log n + page) (a ``community``/``course``
filter also walks the contacts whose items do not match: with five communities, ~17 contacts per
membership served); deleting a contact takes its memberships and enrollments with it, and added
contacts come with theirs. A test may also add one to an existing contact (``add_relation``: its
id is above every id given so far, as the platform's are) or remove one (``remove_relation``);
those few are held as they are and merged into the walk in id order.
Their records embed the community, course and contact as they are when served.

This module is deliberately independent of the rest of ``mkt_assets``: it is a fake of the real
API, and tests compare the real client against it.
"""

from __future__ import annotations

import copy
import heapq
import random
import threading
import unicodedata
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from itertools import accumulate, islice
from typing import Any, NamedTuple

Record = dict[str, Any]

RESOURCES: tuple[str, ...] = (
    "communities", "contacts", "tags", "contact_fields", "course_resources", "memberships", "enrollments",
)  # fmt: skip

# The filters of the two relation collections, as the spec names them (each takes one id).
FILTERS: dict[str, tuple[str, ...]] = {
    "memberships": ("community", "contact"),
    "enrollments": ("course", "contact"),
}

# The spec types accessType as a plain string; these three are the values the simulator serves.
ACCESS_TYPES: tuple[str, ...] = ("full_access", "partial_access", "dripping_content")

# The 28 values of the contact `locale` enum in the official OpenAPI description.
LOCALES: tuple[str, ...] = (
    "en", "fr", "es", "it", "pt", "de", "nl", "ru", "jp", "tr", "ar", "zh", "sv", "ro",
    "cs", "hu", "sk", "dk", "id", "pl", "el", "sr", "hi", "no", "th", "sq", "sl", "ua",
)  # fmt: skip

# Standard systeme.io contact fields first; custom ones are appended when more are asked for.
_STANDARD_FIELDS: tuple[tuple[str, str], ...] = (
    ("first_name", "First name"),
    ("surname", "Surname"),
    ("phone_number", "Phone number"),
    ("country", "Country"),
    ("city", "City"),
    ("street_address", "Street address"),
    ("postcode", "Postcode"),
    ("company_name", "Company name"),
    ("state", "State"),
    ("website_url", "Website"),
)

# Tag names that tend to break naive loaders: unicode, quotes, SQL, whitespace, emoji.
_TRICKY_TAG_NAMES: tuple[str, ...] = (
    "Café ☕",
    "日本語",
    'He said "buy"',
    "O'Reilly's list",
    "x'); DROP TABLE contacts;--",
    "Ünïcödé – ñ",
    "  padded  ",
    "emoji 🚀🔥",
)
_TAG_WORDS: tuple[str, ...] = (
    "newsletter", "lead", "customer", "webinar", "vip", "black-friday", "trial", "churned",
    "affiliate", "coaching", "ebook", "summit", "cold", "warm", "hot", "beta",
)  # fmt: skip

_FIRST_NAMES: tuple[str, ...] = (
    "Alice", "Bruno", "Chloé", "Dmitri", "Élodie", "François", "Gül", "Hiroshi", "Inès", "Jürgen",
    "Kateryna", "Léa", "Mårten", "Nuno", "Oğuz", "Paweł", "Quentin", "Rūta", "Søren", "Zoë",
)  # fmt: skip
_SURNAMES: tuple[str, ...] = (
    "Martin", "Müller", "O'Brien", "García", "Rossi", "Nowak", "Dubois", "Sørensen", "Tanaka",
    "Kowalczyk", "Shevchenko", "Yılmaz", "da Silva", "Van der Berg", "Petrović", "Lefèvre",
)  # fmt: skip
_CITIES: tuple[str, ...] = (
    "Paris", "Lyon", "Kraków", "København", "Kyiv", "Tōkyō", "São Paulo", "Zürich", "İstanbul",
    "Montréal",
)  # fmt: skip
_COUNTRIES: tuple[str, ...] = ("FR", "DE", "PL", "DK", "UA", "JP", "BR", "CH", "TR", "CA", "US", "ES")
_EMAIL_DOMAINS: tuple[str, ...] = ("example.com", "mail.example.org", "example.net", "exemple.fr")
_SITE_DOMAINS: tuple[str, ...] = ("academy.example.com", "shop.example.org", "learn.example.net")

_COURSE_TOPICS: tuple[str, ...] = (
    "Email marketing 101", "Funnels that convert", "Écrire pour vendre", "Webinar mastery",
    "Affiliate basics", "Copywriting – advanced", "Lancement de produit", "日本語で学ぶマーケティング",
    "Community building", "Pricing psychology", "SEO for creators", "Automations deep dive",
)  # fmt: skip
_COMMUNITY_NAMES: tuple[str, ...] = (
    "Members' lounge", "Club des créateurs", "Launch crew", "VIP circle 💎", "Beta testers",
    "Alumni",
)  # fmt: skip

# Contacts are spread over roughly five years ending at the end of 2024.
_TIME_ORIGIN = datetime(2019, 1, 1, tzinfo=timezone.utc)
_TIME_SPAN_SECONDS = 6 * 365 * 24 * 3600
# Mean gap between consecutive generated ids (see _id_sequence), used to size the time step.
_MEAN_ID_GAP = 2.2


class _Relation(NamedTuple):
    """How one relation collection is derived from the contacts."""

    salt: int  # keeps the two collections' hashes independent
    id_offset: int  # item id = 4 * contact id + id_offset + slot
    none_below: int  # a 16-bit draw below this: the contact has none
    one_below: int  # ... else below this: one; else two (fewer if the account has fewer targets)
    target_filter: str  # the filter naming the other side ("community" / "course")


# P(0, 1, 2) = (.75, .20, .05): 0.30 memberships per contact; (.68, .24, .08): 0.40 enrollments.
_RELATIONS: dict[str, _Relation] = {
    "memberships": _Relation(0x6D656D62, 0, 49_152, 62_259, "community"),
    "enrollments": _Relation(0x656E726F, 2, 44_564, 60_293, "course"),
}
_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15  # splitmix64's increment: consecutive ids land far apart
# The fields of a contact that an enrollment embeds (all but fields and tags), in record order.
_EMBEDDED_CONTACT_KEYS: tuple[str, ...] = (
    "id", "email", "registeredAt", "locale", "sourceURL", "unsubscribed", "bounced", "needsConfirmation",
)  # fmt: skip
_EMBEDDED_COURSE_KEYS: tuple[str, ...] = ("id", "locale", "path", "active", "name")


class SandboxData:
    """A deterministic, mutable fake systeme.io account.

    ``contacts`` is the only required size; the other sizes default to values drawn from
    ``seed`` (tags ~40, communities ~5, courses ~12, contact fields ~8) and may be overridden.
    Memberships and enrollments follow from the contacts (0-2 each per contact; an account with a
    single community or course caps them at one, one without any has none).
    """

    def __init__(
        self,
        seed: int = 0,
        contacts: int = 1000,
        *,
        tags: int | None = None,
        communities: int | None = None,
        courses: int | None = None,
        contact_fields: int | None = None,
    ) -> None:
        if contacts < 0:
            raise ValueError(f"contacts must be >= 0, got {contacts}")
        self.seed = seed
        sizes = random.Random(f"{seed}:sizes")
        n_tags = _size(tags, sizes.randint(36, 44), "tags")
        n_communities = _size(communities, sizes.randint(4, 6), "communities")
        n_courses = _size(courses, sizes.randint(10, 14), "courses")
        n_fields = _size(contact_fields, sizes.randint(7, 9), "contact_fields")

        # One lock guards the contact id array and the overrides: the server reads pages from
        # many threads while a test may mutate the account.
        self._lock = threading.RLock()
        self._contact_fields = _make_contact_fields(n_fields)
        self._tags = _make_tags(seed, n_tags)
        self._tag_names = {tag["id"]: tag["name"] for tag in self._tags}
        self._communities = _make_communities(seed, n_communities)
        self._courses = _make_courses(seed, n_courses)
        self._small: dict[str, list[Record]] = {
            "communities": self._communities,
            "tags": self._tags,
            "course_resources": self._courses,
        }
        self._small_ids: dict[str, list[int]] = {
            name: [record["id"] for record in records] for name, records in self._small.items()
        }
        # What each relation links a contact to, and the per-seed base of its hash.
        self._targets: dict[str, list[Record]] = {"memberships": self._communities, "enrollments": self._courses}
        self._target_index: dict[str, dict[int, int]] = {
            name: {record["id"]: index for index, record in enumerate(records)}
            for name, records in self._targets.items()
        }
        self._relation_bases: dict[str, int] = {
            name: _mix64((seed * 0x100000001B3 + relation.salt) & _MASK64) for name, relation in _RELATIONS.items()
        }

        # The id generator is kept so add_contacts() continues the same deterministic sequence.
        self._id_rng = random.Random(f"{seed}:contact-ids")
        first_id = self._id_rng.randint(1_000, 50_000)
        self._contact_ids = array("q", _id_sequence(self._id_rng, first_id, contacts))
        self._next_id = (self._contact_ids[-1] if contacts else first_id - 1) + 1
        # registeredAt = origin + (id - first_id) * step + jitter(< step): strictly increasing
        # with id and computable from the id alone, so the registeredAfter filter is a binary
        # search. The step spreads the initial contacts over the time span (at most a day apart).
        self._first_id = first_id
        self._time_step = max(1, min(86_400, int(_TIME_SPAN_SECONDS / (max(contacts, 1) * _MEAN_ID_GAP))))
        self._tag_overrides: dict[int, tuple[int, ...]] = {}
        # Contacts that opted in (opt_in): subscribed and confirmed, whatever their seed drew.
        self._opted_in: set[int] = set()
        # Relations a test added to existing contacts, ``(item id, contact id, target index)`` in
        # ascending id order, and the ids of those it removed (derived or added).
        self._added: dict[str, list[_Slot]] = {name: [] for name in _RELATIONS}
        self._removed: dict[str, set[int]] = {name: set() for name in _RELATIONS}

    # ----------------------------------------------------------------- read access

    @property
    def contact_ids(self) -> array[int]:
        """A copy of the live contact ids, ascending (an ``array('q')``; cheap even at 1M)."""
        with self._lock:
            return array("q", self._contact_ids)

    @property
    def tag_ids(self) -> list[int]:
        return list(self._small_ids["tags"])

    @property
    def community_ids(self) -> list[int]:
        return list(self._small_ids["communities"])

    @property
    def course_ids(self) -> list[int]:
        return list(self._small_ids["course_resources"])

    @property
    def contact_field_slugs(self) -> list[str]:
        return [field["slug"] for field in self._contact_fields]

    def count(self, resource: str) -> int:
        """Number of records the API currently holds for ``resource``."""
        _check_resource(resource)
        if resource == "contacts":
            with self._lock:
                return len(self._contact_ids)
        if resource == "contact_fields":
            return len(self._contact_fields)
        if resource in _RELATIONS:
            # O(contacts): one hash per contact, fine for the small accounts tests count.
            ids, added, removed = self._relations_snapshot(resource)
            return sum(1 for _ in self._relation_walk(resource, ids, 0, len(ids), True, None, False, None, added, removed))
        return len(self._small[resource])

    def records(self, resource: str) -> Iterator[Record]:
        """Every record of ``resource`` in ascending id order (contact fields: served order).

        Records are fresh copies; mutating them does not change the account.
        """
        _check_resource(resource)
        if resource == "contacts":
            with self._lock:
                ids = array("q", self._contact_ids)
            return (self.contact(contact_id) for contact_id in ids)
        if resource == "contact_fields":
            return iter(copy.deepcopy(self._contact_fields))
        if resource in _RELATIONS:
            # A snapshot: later mutations do not disturb the iteration.
            ids, added, removed = self._relations_snapshot(resource)
            slots = self._relation_walk(resource, ids, 0, len(ids), True, None, False, None, added, removed)
            return (self._relation_record(resource, *slot) for slot in slots)
        return iter(copy.deepcopy(self._small[resource]))

    def contact(self, contact_id: int) -> Record:
        """Build the record of one live contact (KeyError if it does not exist)."""
        with self._lock:
            if not self._has_contact(contact_id):
                raise KeyError(f"no contact with id {contact_id}")
            tag_override = self._tag_overrides.get(contact_id)
            opted_in = contact_id in self._opted_in
        return self._build_contact(contact_id, tag_override, opted_in)

    @property
    def next_contact_id(self) -> int:
        """The id ``add_contacts`` gives its next contact: above every id ever used (deleted too)."""
        with self._lock:
            return self._next_id

    def phantom_contact(self) -> Record:
        """The record the next added contact will have (id ``next_contact_id``), not registered.

        What a reference to a contact that registered after the contacts were read looks like:
        the ``dangling`` fault embeds it. Its tags are the ones it would be created with.
        """
        return self._build_contact(self.next_contact_id, None)

    @property
    def unused_tag_id(self) -> int:
        """A tag id no tag has (tags are fixed, so none ever will): above the highest one."""
        return max(self._small_ids["tags"], default=0) + 1

    def registered_at(self, contact_id: int) -> datetime:
        """When a contact (live, deleted or future) registered: a pure function of its id."""
        return _TIME_ORIGIN + timedelta(seconds=self._registered_offset(contact_id))

    # ----------------------------------------------------------------- paging

    def page(
        self,
        resource: str,
        *,
        limit: int,
        order: str,
        starting_after: int | None = None,
        registered_after: datetime | None = None,
        registered_before: datetime | None = None,
        filters: Mapping[str, int] | None = None,
        repeat_cursor: bool = False,
    ) -> tuple[list[Record], bool]:
        """One page of ``resource`` as the API would serve it: ``(items, has_more)``.

        ``order`` is ``"asc"`` or ``"desc"``; ``starting_after`` need not be a live id. The
        ``registered_*`` filters apply to contacts only (strict bounds). ``filters`` are the
        relation collections' id filters (``FILTERS``: memberships ``community``/``contact``,
        enrollments ``course``/``contact``), all of which must match; a filter another resource
        does not take is a ValueError. With ``repeat_cursor`` the page is the one *ending* at
        ``starting_after`` (the page the client already has), so its last id equals the cursor it
        was asked for: the fault of a cursor that does not advance. Contact fields ignore every
        parameter and come back whole in one page.
        """
        _check_resource(resource)
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
        unknown = sorted(set(filters or {}) - set(FILTERS.get(resource, ())))
        if unknown:
            raise ValueError(f"{resource} take no filter {unknown}; they take {list(FILTERS.get(resource, ()))}")
        if resource == "contact_fields":
            return copy.deepcopy(self._contact_fields), False
        if resource in _RELATIONS:
            return self._relation_page(resource, limit, order, starting_after, filters or {}, repeat_cursor)
        if resource != "contacts":
            ids: Sequence[int] = self._small_ids[resource]
            window = _window(ids, 0, len(ids), limit, order, starting_after, repeat_cursor)
            by_id = self._small[resource]
            items = [copy.deepcopy(by_id[i]) for i in window.indexes]
            return items, window.has_more
        with self._lock:
            ids = self._contact_ids
            lo, hi = self._registered_bounds(registered_after, registered_before)
            window = _window(ids, lo, hi, limit, order, starting_after, repeat_cursor)
            chosen = [(ids[i], self._tag_overrides.get(ids[i]), ids[i] in self._opted_in) for i in window.indexes]
        return [self._build_contact(*contact) for contact in chosen], window.has_more

    # ----------------------------------------------------------------- mutations

    def add_contacts(self, n: int) -> list[int]:
        """Register ``n`` new contacts; their ids are above every id ever used."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        with self._lock:
            new_ids = list(_id_sequence(self._id_rng, self._next_id, n))
            self._contact_ids.extend(new_ids)
            if new_ids:
                self._next_id = new_ids[-1] + 1
        return new_ids

    def delete_contact(self, contact_id: int) -> None:
        """Delete a contact; its id stays usable as a pagination cursor."""
        with self._lock:
            index = bisect_left(self._contact_ids, contact_id)
            if index == len(self._contact_ids) or self._contact_ids[index] != contact_id:
                raise KeyError(f"no contact with id {contact_id}")
            self._contact_ids.pop(index)  # a memmove: fine for a test mutation, even at 1M
            self._tag_overrides.pop(contact_id, None)
            self._opted_in.discard(contact_id)

    def add_relation(self, resource: str, contact_id: int, target_id: int) -> int:
        """A new membership (``target_id``: a community) or enrollment (a course) of a live
        contact; its id, above every id given so far, as the platform gives a new record's.

        It takes the place of a contact id never to be registered (``next_contact_id`` moves on),
        so contacts added later still have relations with higher ids than this one."""
        relation = _relation(resource)
        with self._lock:
            if not self._has_contact(contact_id):
                raise KeyError(f"no contact with id {contact_id}")
            target = self._target_index[resource].get(target_id)
            if target is None:
                raise KeyError(f"no {relation.target_filter} with id {target_id}")
            item_id = 4 * self._next_id + relation.id_offset
            self._next_id += 1
            self._added[resource].append((item_id, contact_id, target))
        return item_id

    def remove_relation(self, resource: str, item_id: int) -> None:
        """Remove one membership or enrollment; its contact stays. Its id is never given again."""
        _relation(resource)
        with self._lock:
            ids, added, removed = self._contact_ids, self._added[resource], self._removed[resource]
            # The first live record from this id on is the record itself, if it is live.
            found = next(self._relation_walk(resource, ids, 0, len(ids), True, item_id, True, None, added, removed), None)
            if found is None or found[0] != item_id:
                raise KeyError(f"no {resource} record with id {item_id}")
            self._removed[resource].add(item_id)

    def rename_tag(self, tag_id: int, name: str) -> None:
        """Rename a tag's own record; the contacts keep the name their lists embed, so only a
        read of the tags sees it (what contact_tags takes the current name from)."""
        with self._lock:
            (tag,) = [tag for tag in self._tags if tag["id"] == tag_id]
            tag["name"] = name

    def set_contact_tags(self, contact_id: int, tag_ids: Sequence[int]) -> None:
        """Replace a contact's tags (the kind of change only a full re-read can see)."""
        unknown = [tag_id for tag_id in tag_ids if tag_id not in self._tag_names]
        if unknown:
            raise KeyError(f"unknown tag ids {unknown}")
        with self._lock:
            if not self._has_contact(contact_id):
                raise KeyError(f"no contact with id {contact_id}")
            self._tag_overrides[contact_id] = tuple(sorted(set(tag_ids)))

    def add_contact_tag(self, contact_id: int, tag_id: int) -> bool:
        """Give a contact one more tag; False, and nothing changes, if it has it already."""
        with self._lock:
            tag_ids = [tag["id"] for tag in self.contact(contact_id)["tags"]]
            if tag_id in tag_ids:
                return False
            self.set_contact_tags(contact_id, [*tag_ids, tag_id])
        return True

    def remove_contact_tag(self, contact_id: int, tag_id: int) -> bool:
        """Take a tag from a contact; False, and nothing changes, if it does not have it."""
        with self._lock:
            tag_ids = [tag["id"] for tag in self.contact(contact_id)["tags"]]
            if tag_id not in tag_ids:
                if tag_id not in self._tag_names:
                    raise KeyError(f"unknown tag ids {[tag_id]}")
                return False
            self.set_contact_tags(contact_id, [other for other in tag_ids if other != tag_id])
        return True

    def opt_in(self, contact_id: int) -> bool:
        """The contact confirms its subscription: from now on ``needsConfirmation`` and
        ``unsubscribed`` are false (in its record and where enrollments embed it). False when
        both already were, so nothing visible changed."""
        with self._lock:
            record = self.contact(contact_id)
            self._opted_in.add(contact_id)
        return bool(record["needsConfirmation"] or record["unsubscribed"])

    # ----------------------------------------------------------------- internals

    def _has_contact(self, contact_id: int) -> bool:
        index = bisect_left(self._contact_ids, contact_id)
        return index < len(self._contact_ids) and self._contact_ids[index] == contact_id

    def _contact_rng(self, contact_id: int) -> random.Random:
        # Seeded per contact so any record can be rebuilt alone; an int seed is the cheapest.
        return random.Random(self.seed * 1_000_003 + contact_id)

    def _registered_offset(self, contact_id: int) -> int:
        """Seconds from the time origin to the contact's registration."""
        return self._registered_offset_from(self._contact_rng(contact_id), contact_id)

    def _registered_offset_from(self, rng: random.Random, contact_id: int) -> int:
        # The jitter must be the first draw of the contact's generator: the filter computes it
        # alone, the record builder computes it before everything else, and both must agree.
        jitter = rng.randrange(self._time_step)
        return (contact_id - self._first_id) * self._time_step + jitter

    def _registered_bounds(self, after: datetime | None, before: datetime | None) -> tuple[int, int]:
        """Index range [lo, hi) of contacts registered strictly after/before the bounds."""
        ids = self._contact_ids
        lo, hi = 0, len(ids)
        if after is not None:
            lo = bisect_right(ids, _offset_of(after), key=self._registered_offset)
        if before is not None:
            hi = bisect_left(ids, _offset_of(before), key=self._registered_offset)
        return lo, max(lo, hi)

    def _build_contact(self, contact_id: int, tag_override: tuple[int, ...] | None, opted_in: bool = False) -> Record:
        rng = self._contact_rng(contact_id)
        registered = _TIME_ORIGIN + timedelta(seconds=self._registered_offset_from(rng, contact_id))
        first, last = rng.choice(_FIRST_NAMES), rng.choice(_SURNAMES)
        email = f"{_EMAIL_SLUGS[first]}.{_EMAIL_SLUGS[last]}.{contact_id}@{rng.choice(_EMAIL_DOMAINS)}"
        locale = _pick_locale(rng)
        source_url = _pick_source_url(rng)
        unsubscribed = rng.random() < 0.08
        bounced = rng.random() < 0.03
        needs_confirmation = rng.random() < 0.06
        if opted_in:  # after the draws, so the rest of the record stays what the seed made it
            unsubscribed = needs_confirmation = False
        fields = _pick_fields(rng, self._contact_fields, first, last)
        tag_ids = self._pick_tag_ids(rng) if tag_override is None else tag_override
        return {
            "id": contact_id,
            "email": email,
            "registeredAt": _iso(registered),
            "locale": locale,
            "sourceURL": source_url,
            "unsubscribed": unsubscribed,
            "bounced": bounced,
            "needsConfirmation": needs_confirmation,
            "fields": fields,
            "tags": [{"id": tag_id, "name": self._tag_names[tag_id]} for tag_id in tag_ids],
        }

    # ----------------------------------------------------------------- relations

    def _slots(self, resource: str, contact_id: int) -> tuple[tuple[int, int], ...]:
        """``(item id, target index)`` of one contact's memberships or enrollments, by slot.

        A few integer operations, never the contact record: a page may hash a few hundred
        contacts to find its items, and count() hashes them all.
        """
        relation = _RELATIONS[resource]
        targets = len(self._targets[resource])
        draw = _mix64((self._relation_bases[resource] + contact_id * _GOLDEN64) & _MASK64)
        low = draw & 0xFFFF
        if targets == 0 or low < relation.none_below:
            return ()
        first_id = 4 * contact_id + relation.id_offset
        first = (draw >> 16) % targets
        if targets == 1 or low < relation.one_below:
            return ((first_id, first),)
        # A second, different target: an offset of 1..targets-1 from the first.
        second = (first + 1 + (draw >> 32) % (targets - 1)) % targets
        return (first_id, first), (first_id + 1, second)

    def _relation_slots(
        self,
        resource: str,
        ids: Sequence[int],
        lo: int,
        hi: int,
        ascending: bool,
        cursor: int | None,
        inclusive: bool,
        target: int | None,
        removed: Collection[int] = (),
    ) -> Iterator[_Slot]:
        """``(item id, contact id, target index)`` of the contacts ids[lo:hi], in id order.

        Only items beyond ``cursor`` in that order (``inclusive``: the cursor's own id too) and,
        when ``target`` is set, linked to that target. The start is a binary search for the
        cursor's contact (item id // 4, whatever the slot), so a page costs O(log n + contacts
        walked). The caller holds the lock (or passes a snapshot) while it iterates.
        """
        step = 1 if ascending else -1
        if ascending:
            index = lo if cursor is None else max(lo, bisect_left(ids, cursor // 4))
        else:
            index = (hi if cursor is None else min(hi, bisect_right(ids, cursor // 4))) - 1
        while lo <= index < hi:
            contact_id = ids[index]
            slots = self._slots(resource, contact_id)
            for item_id, target_index in slots if ascending else reversed(slots):
                if target is not None and target_index != target:
                    continue
                if cursor is not None and not (
                    (item_id > cursor if ascending else item_id < cursor) or (inclusive and item_id == cursor)
                ):
                    continue
                if item_id in removed:
                    continue
                yield item_id, contact_id, target_index
            index += step

    def _relations_snapshot(self, resource: str) -> tuple[array[int], list[_Slot], frozenset[int]]:
        """The live contact ids and the relations added and removed, as they are now."""
        with self._lock:
            return array("q", self._contact_ids), list(self._added[resource]), frozenset(self._removed[resource])

    def _relation_walk(
        self,
        resource: str,
        ids: Sequence[int],
        lo: int,
        hi: int,
        ascending: bool,
        cursor: int | None,
        inclusive: bool,
        target: int | None,
        added: Sequence[_Slot],
        removed: Collection[int],
    ) -> Iterator[_Slot]:
        """``_relation_slots``, with the relations added to contacts of ids[lo:hi] merged in id order."""
        derived = self._relation_slots(resource, ids, lo, hi, ascending, cursor, inclusive, target, removed)
        if not added:
            return derived
        start, end = 0, len(added)
        if cursor is not None and ascending:
            start = (bisect_left if inclusive else bisect_right)(added, cursor, key=_item_id)
        elif cursor is not None:
            end = (bisect_right if inclusive else bisect_left)(added, cursor, key=_item_id)
        beyond = iter(added[start:end]) if ascending else reversed(added[start:end])

        def kept(slot: _Slot) -> bool:
            item_id, contact_id, target_index = slot
            if item_id in removed or (target is not None and target_index != target):
                return False
            index = bisect_left(ids, contact_id, lo, hi)  # its contact live, within the walk's contacts
            return index < hi and ids[index] == contact_id

        return heapq.merge(derived, filter(kept, beyond), key=_item_id, reverse=not ascending)

    def _relation_page(
        self,
        resource: str,
        limit: int,
        order: str,
        cursor: int | None,
        filters: Mapping[str, int],
        repeat_cursor: bool,
    ) -> tuple[list[Record], bool]:
        ascending = order == "asc"
        target: int | None = None
        target_id = filters.get(_RELATIONS[resource].target_filter)
        with self._lock:
            ids = self._contact_ids
            lo, hi = 0, len(ids)
            if target_id is not None:
                target = self._target_index[resource].get(target_id)
                if target is None:  # no such community/course: nothing to walk for
                    lo = hi
            contact_id = filters.get("contact")
            if contact_id is not None:
                # One contact at most: the walk is confined to its place in the id array.
                lo = bisect_left(ids, contact_id) if lo < hi else lo
                hi = lo + 1 if lo < hi and ids[lo] == contact_id else lo

            added, removed = self._added[resource], self._removed[resource]

            def walk(forwards: bool, inclusive: bool) -> Iterator[_Slot]:
                return self._relation_walk(resource, ids, lo, hi, forwards, cursor, inclusive, target, added, removed)

            if cursor is not None and repeat_cursor:
                # The page ending at the cursor, walked backwards from it, then put in order.
                chosen = list(islice(walk(not ascending, True), limit))
                chosen.reverse()
                has_more = next(walk(ascending, False), None) is not None
            else:
                chosen = list(islice(walk(ascending, False), limit + 1))  # one more tells hasMore
                has_more = len(chosen) > limit
                del chosen[limit:]
        # Built outside the lock: a record depends on (seed, ids) only, and on opt-ins (see
        # _embedded_contact), never on tags.
        return [self._relation_record(resource, *slot) for slot in chosen], has_more

    def _relation_record(self, resource: str, item_id: int, contact_id: int, target_index: int) -> Record:
        target = self._targets[resource][target_index]
        if resource == "memberships":
            return {"id": item_id, "community": dict(target), "contact": {"id": contact_id}}
        # Attributes from a second hash of the item id, so the two slots of a contact differ.
        draw = _mix64(((self._relation_bases[resource] ^ 0x5DEECE66D) + item_id * _GOLDEN64) & _MASK64)
        return {
            "id": item_id,
            "contact": self._embedded_contact(contact_id),
            "course": {key: target[key] for key in _EMBEDDED_COURSE_KEYS},
            "accessType": _pick_access_type(draw & 0xFF),
            "active": (draw >> 8) & 0xFF < 224,  # 7 in 8: a few enrollments are suspended
        }

    def _embedded_contact(self, contact_id: int) -> Record:
        """The contact as ``contact()`` builds it, minus fields and tags (what enrollments embed)."""
        # No tag override lookup: tags are dropped anyway. Outside the lock (see _relation_page):
        # one membership test of a set is atomic, and an opt-in racing a page may land either side.
        record = self._build_contact(contact_id, (), contact_id in self._opted_in)
        return {key: record[key] for key in _EMBEDDED_CONTACT_KEYS}

    def _pick_tag_ids(self, rng: random.Random) -> tuple[int, ...]:
        tag_ids = self._small_ids["tags"]
        if not tag_ids or rng.random() < 0.3:
            return ()
        k = min(len(tag_ids), rng.randint(1, 5))
        return tuple(sorted(rng.sample(tag_ids, k)))


# --------------------------------------------------------------------- paging helpers

# One membership or enrollment as the walk finds it: (item id, contact id, target index).
_Slot = tuple[int, int, int]


def _item_id(slot: _Slot) -> int:
    return slot[0]


def _relation(resource: str) -> _Relation:
    if resource not in _RELATIONS:
        raise KeyError(f"{resource!r} is not a relation; expected one of {', '.join(_RELATIONS)}")
    return _RELATIONS[resource]


class _Window:
    """Indexes (in serving order) of one page, and whether more follow in that order."""

    __slots__ = ("has_more", "indexes")

    def __init__(self, indexes: range, has_more: bool) -> None:
        self.indexes = indexes
        self.has_more = has_more


def _window(
    ids: Sequence[int],
    lo: int,
    hi: int,
    limit: int,
    order: str,
    cursor: int | None,
    repeat_cursor: bool,
) -> _Window:
    """Select the page within ids[lo:hi] (ascending ids) by binary search: O(log n + limit)."""
    if order == "asc":
        if cursor is not None and repeat_cursor:
            end = min(hi, bisect_right(ids, cursor))
            start = max(lo, end - limit)
        else:
            start = lo if cursor is None else max(lo, bisect_right(ids, cursor))
            end = min(hi, start + limit)
        return _Window(range(start, max(start, end)), end < hi)
    if cursor is not None and repeat_cursor:
        start = max(lo, bisect_left(ids, cursor))
        end = min(hi, start + limit)
    else:
        end = hi if cursor is None else min(hi, bisect_left(ids, cursor))
        start = max(lo, end - limit)
    return _Window(range(end - 1, start - 1, -1), start > lo)


# --------------------------------------------------------------------- generators


def _mix64(value: int) -> int:
    """splitmix64's finalizer: a cheap, well-spread 64-bit hash of a 64-bit integer."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK64
    return value ^ (value >> 31)


def _pick_access_type(draw: int) -> str:
    """Six in ten enrollments have full access, a quarter partial, the rest dripping content."""
    if draw < 154:
        return ACCESS_TYPES[0]
    return ACCESS_TYPES[1] if draw < 218 else ACCESS_TYPES[2]


def _size(override: int | None, default: int, name: str) -> int:
    size = default if override is None else override
    if size < 0:
        raise ValueError(f"{name} must be >= 0, got {size}")
    return size


def _check_resource(resource: str) -> None:
    if resource not in RESOURCES:
        raise KeyError(f"unknown resource {resource!r}; expected one of {', '.join(RESOURCES)}")


def _id_sequence(rng: random.Random, first: int, n: int) -> Iterator[int]:
    """``n`` ascending ids from ``first`` with gaps of 1..5 (ids are not contiguous)."""
    if n == 0:
        return iter(())
    gaps = rng.choices((1, 2, 3, 4, 5), weights=(4, 3, 1, 1, 1), k=n - 1)
    return accumulate(gaps, initial=first)


def _small_ids(rng: random.Random, n: int, first_low: int, first_high: int) -> list[int]:
    return list(_id_sequence(rng, rng.randint(first_low, first_high), n))


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")  # "2024-01-01T00:00:00+00:00"


def _offset_of(moment: datetime) -> float:
    """Seconds from the time origin; naive datetimes are taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _TIME_ORIGIN).total_seconds()


# Letters that NFKD does not decompose into an ASCII base letter.
_ASCII_FALLBACK = str.maketrans({"ø": "o", "ł": "l", "ı": "i", "æ": "ae", "ß": "ss"})


def _ascii_slug(text: str) -> str:
    """ASCII local part for an email ("Søren O'Brien" -> "soren", "obrien")."""
    decomposed = unicodedata.normalize("NFKD", text.lower().translate(_ASCII_FALLBACK))
    return "".join(ch for ch in decomposed if ch.isascii() and ch.isalnum())


# Precomputed: slugging on every served contact would dominate the cost of a page.
_EMAIL_SLUGS: dict[str, str] = {name: _ascii_slug(name) for name in _FIRST_NAMES + _SURNAMES}


def _pick_locale(rng: random.Random) -> str:
    # Most accounts are English or French; the long tail covers the odd codes (jp, dk, ua).
    draw = rng.random()
    if draw < 0.4:
        return "en"
    if draw < 0.65:
        return "fr"
    return rng.choice(LOCALES)


def _pick_source_url(rng: random.Random) -> str | None:
    if rng.random() < 0.3:
        return None
    campaign = rng.choice(("spring", "launch", "webinar", "ads"))
    return f"https://{rng.choice(_SITE_DOMAINS)}/optin?utm_source={campaign}&ref={rng.randint(1, 999)}"


def _field_value(rng: random.Random, slug: str, first: str, last: str) -> str:
    # Only the requested value draws from rng: building a page must stay cheap.
    if slug == "first_name":
        return first
    if slug == "surname":
        return last
    if slug == "city":
        return rng.choice(_CITIES)
    if slug == "country":
        return rng.choice(_COUNTRIES)
    if slug == "phone_number":
        return f"+33 6 {rng.randrange(10**8):08d}"
    if slug == "postcode":
        return f"{rng.randrange(1000, 99999):05d}"
    return f"{slug.replace('_', ' ')} {rng.randrange(1, 500)}"


def _pick_fields(rng: random.Random, fields: list[Record], first: str, last: str) -> list[Record]:
    if rng.random() < 0.25:
        return []
    picked = []
    for field in fields:
        if rng.random() >= 0.6:
            continue
        draw = rng.random()
        # The API reports a never-set value as null or "", both seen in the wild.
        value: str | None = None if draw < 0.1 else "" if draw < 0.2 else _field_value(rng, field["slug"], first, last)
        picked.append({"fieldName": field["fieldName"], "slug": field["slug"], "value": value})
    return picked


def _make_contact_fields(n: int) -> list[Record]:
    fields = [{"fieldName": name, "slug": slug} for slug, name in _STANDARD_FIELDS[:n]]
    fields += [
        {"fieldName": f"Custom field {i}", "slug": f"custom_field_{i}"}
        for i in range(1, n - len(fields) + 1)
    ]
    return fields


def _make_tags(seed: int, n: int) -> list[Record]:
    rng = random.Random(f"{seed}:tags")
    ids = _small_ids(rng, n, 100, 900)
    moment = datetime(2019, 3, 1, 9, 30, tzinfo=timezone.utc)
    tags = []
    for index, tag_id in enumerate(ids):
        moment += timedelta(hours=rng.randint(1, 24 * 40), seconds=rng.randint(0, 3599))
        if index < len(_TRICKY_TAG_NAMES):
            name = _TRICKY_TAG_NAMES[index]
        else:
            name = f"{rng.choice(_TAG_WORDS)}-{index}"
        tags.append({"id": tag_id, "name": name, "createdAt": _iso(moment)})
    return tags


def _nth_name(names: Sequence[str], index: int) -> str:
    """The index-th name, cycling with a number suffix so names stay unique."""
    base = names[index % len(names)]
    return base if index < len(names) else f"{base} ({index})"


def _make_communities(seed: int, n: int) -> list[Record]:
    rng = random.Random(f"{seed}:communities")
    ids = _small_ids(rng, n, 10, 500)
    return [
        {
            "id": community_id,
            "name": _nth_name(_COMMUNITY_NAMES, index),
            "domainName": rng.choice(_SITE_DOMAINS),
            "path": f"community-{community_id}",
        }
        for index, community_id in enumerate(ids)
    ]


def _make_courses(seed: int, n: int) -> list[Record]:
    rng = random.Random(f"{seed}:courses")
    ids = _small_ids(rng, n, 1000, 9000)
    courses = []
    for index, course_id in enumerate(ids):
        courses.append(
            {
                "id": course_id,
                "locale": rng.choice(("en", "fr", "de", "es")),
                "domainName": None if rng.random() < 0.25 else rng.choice(_SITE_DOMAINS),
                "path": f"course-{course_id}",
                "active": rng.random() < 0.75,
                "name": _nth_name(_COURSE_TOPICS, index),
                "modules": _make_modules(rng, index),
            }
        )
    return courses


def _make_modules(rng: random.Random, index: int) -> list[Record]:
    # Every fourth course has no modules; some modules are drafts with a null id or name (the
    # second course always starts with one, so small accounts show the case too).
    if index % 4 == 3:
        return []
    modules: list[Record] = []
    for position in range(rng.randint(1, 5)):
        draft = rng.random() < 0.2 or (index == 1 and position == 0)
        module_id = None if draft else rng.randint(10_000, 99_999)
        name = None if draft and rng.random() < 0.5 else f"Module {position + 1}"
        modules.append({"id": module_id, "name": name})
    return modules
