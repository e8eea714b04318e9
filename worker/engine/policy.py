"""The scheduling policy: before each decode step, which lane steps and which waiting
requests join it. Pure: plain data in, a decision out (no torch, no Redis), so it is tested
alone, with properties, and the engine and the worker share it.

Lanes. Rows run in lanes keyed by (priority, adapter): one adapter per forward pass (Unsloth's
GPU fast path ignores PEFT's per-row ``adapter_names``), and interactive rows never decode at
the pace of a full bulk batch. Each loop iteration serves one lane: admit joiners, step once.

The continuous rules:
- Interactive first. While an interactive lane has rows or an interactive request waits,
  interactive lanes are served and bulk work is paused (bulk lanes keep their KV), except that
  bulk gets one turn once it has been kept waiting ``max_bulk_pause_s`` (``bulk_starved_since``).
- A bulk request is admitted only when no interactive request waits, so no interactive request
  ever waits behind a bulk request admitted after it; if KV room is what an interactive request
  lacks, the youngest bulk rows are evicted back to the queue (they restart later). So a bulk
  request is admitted within ``max_bulk_pause_s`` of a moment when no interactive request waits
  and its lane has room.
- Bulk requests take turns (``fair_order``): weighted round-robin across owners (an owner of
  weight w gets w turns per round), then across each owner's jobs, oldest first within a job;
  with one owner and one job this is submit order. So a small job submitted behind another
  owner's large backlog finishes after about (its size x active owners) admissions.
- Bulk joiners: the first waiting request of the lane's adapter in turn order (it is always
  admitted first: anti-starvation), then the rest of its round, closest in prompt length first,
  then later rounds. When the first bulk request overall cannot join for lack of KV room,
  other bulk lanes admit nothing until it can, so no adapter starves.
- Limits: rows per lane (``max_rows``, lower after an out-of-memory error), KV tokens reserved
  across lanes (prompt + ``max_new_tokens`` per row: ``GENQ_MAX_BATCH_TOKENS``), prompt tokens
  prefilled per join (``max_prefill_tokens``; one joiner always fits).

A *suspect* (a request that was running on a worker that died) never reaches these rules: the
step loop runs it alone (``worker.engine.waiting``).

The static rules (``GENQ_SCHEDULER=static``, kept for comparison): one lane at a time, run until
its last row finishes; the next batch is the oldest interactive request (or the oldest request
overall once it has waited ``max_wait_s``) and its closest neighbours in length, same adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.engine.batching import Row, plan_batches

LaneKey = tuple[str, str | None]  # (priority, adapter)
INTERACTIVE, BULK = "interactive", "bulk"


@dataclass(frozen=True)
class Waiting:
    """A request waiting to join a lane."""

    id: str
    priority: str
    adapter: str | None
    prompt_tokens: int
    max_new_tokens: int
    submitted_at: float
    owner: str | None = None
    job: str | None = None
    weight: int = 1

    @property
    def key(self) -> LaneKey:
        return (self.priority, self.adapter)

    @property
    def reserve(self) -> int:
        """KV tokens this request holds at most once admitted."""
        return self.prompt_tokens + self.max_new_tokens


@dataclass(frozen=True)
class Running:
    """A row in a lane (what eviction needs to know)."""

    id: str
    reserve: int
    admitted_at: float


@dataclass(frozen=True)
class Lane:
    """A lane as the policy sees it."""

    priority: str
    adapter: str | None
    rows: tuple[Running, ...] = ()
    cap: int | None = None  # fewer rows than max_rows after an out-of-memory error
    last_step: float = float("-inf")

    @property
    def key(self) -> LaneKey:
        return (self.priority, self.adapter)

    @property
    def reserved(self) -> int:
        return sum(r.reserve for r in self.rows)


@dataclass(frozen=True)
class Limits:
    """The budgets (from settings)."""

    max_rows: int = 32
    max_kv_tokens: int = 32768
    max_prefill_tokens: int = 8192
    max_bulk_prefill_tokens: int = 512  # bounds how long a bulk join can hold up interactive
    max_bulk_pause_s: float = 1.0
    max_wait_s: float = 30.0  # static mode's overdue rule
    static: bool = False


@dataclass
class Decision:
    """Serve ``lane``: evict ``evict`` (row ids, back to waiting), admit ``admit``, step."""

    lane: LaneKey | None = None
    admit: list[str] = field(default_factory=list)
    evict: list[str] = field(default_factory=list)


def decide(waiting: list[Waiting], lanes: list[Lane], limits: Limits, now: float,
           bulk_starved_since: float | None = None) -> Decision:
    """The next lane to serve and its joiners (an empty decision: nothing to do).
    ``bulk_starved_since``: since when bulk work has waited for a turn (``starved_since``)."""
    if limits.static:
        return _decide_static(waiting, lanes, limits, now)
    by_key = {lane.key: lane for lane in lanes if lane.rows}
    reserved = sum(lane.reserved for lane in by_key.values())
    budget = _Budget(limits, limits.max_kv_tokens - reserved, alone=reserved == 0)
    inter_waiting = sorted((w for w in waiting if w.priority == INTERACTIVE),
                           key=lambda w: w.submitted_at)
    running = {key for key in by_key if key[0] == INTERACTIVE}
    bulk_waiting = fair_order([w for w in waiting if w.priority == BULK])
    bulk_lanes = {key for key in by_key if key[0] == BULK}
    if not (inter_waiting or running):
        return _serve_bulk(bulk_waiting, by_key, budget)
    overdue = (bulk_starved_since is not None
               and now - bulk_starved_since >= limits.max_bulk_pause_s)
    if overdue and not inter_waiting:
        decision = _serve_bulk(bulk_waiting, by_key, budget)
        if decision.lane is not None:
            return decision
    if overdue and bulk_lanes:  # a step, but no admission ahead of a waiting interactive
        return Decision(lane=_round_robin(bulk_lanes, by_key)[0])
    decision = _serve_interactive(inter_waiting, by_key, budget)
    if decision.lane is None and bulk_lanes:  # what waits needs room only finishing rows free
        decision = Decision(lane=_round_robin(bulk_lanes, by_key)[0])
    return decision


def admit_paged(waiting: list[Waiting], running: list[Waiting], max_rows: int, headroom: int,
                max_bulk_prefill: int = 512, bulk_share: int | None = None,
                mix_adapters: bool = True) -> Decision:
    """For a backend that owns its KV cache (vLLM: paged, no lanes): which waiting requests
    enter it now and which running rows leave it (back to waiting, to restart later);
    ``running`` is what is in it, oldest admission first.

    Interactive requests in submit order while fewer than ``max_rows + headroom`` rows are in
    flight (the headroom is theirs alone, so an interactive request joins at the next step
    however full a bulk job keeps the engine). While interactive rows run, bulk keeps at most
    ``bulk_share`` rows (default: a quarter of ``max_rows``; the youngest bulk rows beyond it
    are evicted), so interactive rows decode at the pace of a small batch. Otherwise bulk
    requests fill ``max_rows`` in fair turns (``fair_order``), only once no interactive
    request waits, and at most ``max_bulk_prefill`` prompt tokens a step (one joiner always
    fits): a step that prefills many bulk prompts would hold up an interactive request that
    arrives during it. Without ``mix_adapters`` every row in
    flight has one adapter: a request of another waits until they are done (nothing
    overtakes it), except that an interactive request evicts the bulk rows in its way.
    Memory pressure inside the backend is its own preemption (bulk first), never a refusal
    here."""
    inter = [w for w in waiting if w.priority == INTERACTIVE]
    bulk = fair_order([w for w in waiting if w.priority == BULK])
    share = max(1, max_rows // 4 if bulk_share is None else bulk_share)
    kept = list(running)
    evict: list[str] = []
    busy = bool(inter) or any(r.priority == INTERACTIVE for r in running)
    if busy:
        extra = [r for r in running if r.priority == BULK][share:]
        if inter and not mix_adapters and not any(r.priority == INTERACTIVE for r in running) \
                and any(r.adapter != inter[0].adapter for r in running):
            extra = [r for r in running if r.priority == BULK]  # in the first one's way
        evict = [r.id for r in extra]
        kept = [r for r in running if r.id not in set(evict)]
    adapter = kept[0].adapter if kept else next((w.adapter for w in [*inter, *bulk]), None)
    in_flight, bulk_in_flight = len(kept), sum(r.priority == BULK for r in kept)
    chosen: list[str] = []
    prefill = 0  # bulk prompt tokens admitted this step
    for w in [*inter, *bulk]:
        if w.priority == BULK and (len(chosen) < len(inter) or bulk_in_flight >= (
                share if busy else max_rows)):
            break  # an interactive request still waits, or bulk has its share
        if w.priority == BULK and prefill and prefill + w.prompt_tokens > max_bulk_prefill:
            break
        if in_flight >= max_rows + (headroom if w.priority == INTERACTIVE else 0):
            break
        if not mix_adapters and w.adapter != adapter:
            break
        chosen.append(w.id)
        in_flight += 1
        bulk_in_flight += w.priority == BULK
        prefill += w.prompt_tokens if w.priority == BULK else 0
    return Decision(admit=chosen, evict=evict)

def fair_order(waiting: list[Waiting]) -> list[Waiting]:
    """Requests in weighted turns: owners in round-robin (weight w: w turns per round), each
    owner's turns shared round-robin by its jobs, oldest first within a job."""
    return [w for _, w in _turns(waiting)]


def _turns(waiting: list[Waiting]) -> list[tuple[int, Waiting]]:
    """(round, request) in turn order."""
    owners: dict[str | None, dict[str | None, list[Waiting]]] = {}
    for w in sorted(waiting, key=lambda w: w.submitted_at):
        owners.setdefault(w.owner, {}).setdefault(w.job, []).append(w)
    turns = []
    for jobs in owners.values():
        queues = list(jobs.values())
        interleaved = [q[r] for r in range(max(map(len, queues))) for q in queues if r < len(q)]
        turns += [(i // max(1, w.weight), w) for i, w in enumerate(interleaved)]
    turns.sort(key=lambda t: (t[0], t[1].submitted_at))
    return turns


def _owners_in_turn(waiting: list[Waiting], key) -> list[Waiting]:
    """Each owner's requests ordered by ``key``, the owners taking weighted turns."""
    owners: dict[str | None, list[Waiting]] = {}
    for w in waiting:
        owners.setdefault(w.owner, []).append(w)
    ranked = [(i // max(1, w.weight), n, w) for n, group in enumerate(owners.values())
              for i, w in enumerate(sorted(group, key=key))]
    ranked.sort(key=lambda t: (t[0], t[1]))
    return [w for _, _, w in ranked]


def starved_since(previous: float | None, served: LaneKey | None, bulk_pending: bool,
                  now: float) -> float | None:
    """Track since when bulk work has waited for a turn: reset by a bulk turn, started by the
    first turn that leaves pending bulk work waiting."""
    if not bulk_pending or (served is not None and served[0] == BULK):
        return None
    return now if previous is None else previous


@dataclass
class _Budget:
    limits: Limits
    free_kv: int
    alone: bool  # nothing runs: one request larger than the whole KV budget may run alone

    def room(self, lane: Lane | None) -> int:
        max_rows = self.limits.max_rows
        if lane is None:
            return max_rows
        cap = max_rows if lane.cap is None else min(lane.cap, max_rows)
        return max(cap - len(lane.rows), 0)

    def pick(self, candidates: list[Waiting], lane: Lane | None, free_kv: int) -> list[Waiting]:
        """Joiners from ``candidates`` (in preference order) within the lane's limits."""
        room = self.room(lane)
        cap = self.limits.max_prefill_tokens
        if candidates and candidates[0].key[0] == BULK:
            cap = min(cap, self.limits.max_bulk_prefill_tokens)
        prefill = 0
        chosen: list[Waiting] = []
        for w in candidates:
            if len(chosen) >= room:
                break
            if w.reserve > free_kv and not (self.alone and not chosen):
                continue
            if chosen and prefill + w.prompt_tokens > cap:
                continue
            chosen.append(w)
            prefill += w.prompt_tokens
            free_kv -= w.reserve
            if free_kv < 0:  # the one oversized request runs alone
                break
        return chosen


def _round_robin(keys: set[LaneKey], by_key: dict[LaneKey, Lane]) -> list[LaneKey]:
    """Lanes in serving order: the one stepped longest ago first (a new lane before all)."""
    return sorted(keys, key=lambda k: (by_key[k].last_step if k in by_key else float("-inf"), str(k)))


def _serve_interactive(inter_waiting: list[Waiting], by_key: dict[LaneKey, Lane],
                       budget: _Budget) -> Decision:
    keys = {key for key in by_key if key[0] == INTERACTIVE}
    keys |= {w.key for w in inter_waiting if budget.room(by_key.get(w.key)) > 0}
    evictable = sorted((r for b in by_key.values() if b.priority == BULK for r in b.rows),
                       key=lambda r: r.admitted_at, reverse=True)  # youngest first
    reclaimable = sum(r.reserve for r in evictable)
    for key in _round_robin(keys, by_key):
        lane = by_key.get(key)
        chosen = budget.pick([w for w in inter_waiting if w.key == key], lane,
                             budget.free_kv + reclaimable)
        if not chosen and lane is None:
            continue  # nothing fits there yet: serve a lane that can move
        need = sum(w.reserve for w in chosen) - budget.free_kv
        evict: list[str] = []
        for row in evictable:
            if need <= 0:
                break
            evict.append(row.id)
            need -= row.reserve
        return Decision(lane=key, admit=[w.id for w in chosen], evict=evict)
    return Decision()


def _serve_bulk(bulk_waiting: list[Waiting], by_key: dict[LaneKey, Lane], budget: _Budget) -> Decision:
    running = {key for key in by_key if key[0] == BULK}
    admissible = {w.key for w in bulk_waiting if budget.room(by_key.get(w.key)) > 0}
    oldest = bulk_waiting[0] if bulk_waiting else None
    if (oldest is not None and oldest.key in admissible and oldest.reserve > budget.free_kv
            and not budget.alone):
        admissible = set()  # the oldest waits for KV room: nobody overtakes it meanwhile
    for key in _round_robin(running | admissible, by_key):
        mine = [w for w in bulk_waiting if w.key == key] if key in admissible else []
        chosen: list[Waiting] = []
        if mine:
            anchor = mine[0]
            rest = _owners_in_turn(mine[1:], key=lambda w: (
                abs(w.prompt_tokens - anchor.prompt_tokens), w.submitted_at))
            chosen = budget.pick([anchor, *rest], by_key.get(key), budget.free_kv)
            if chosen[:1] != [anchor]:
                chosen = []  # the oldest goes first or nobody does
        if chosen or key in by_key:
            return Decision(lane=key, admit=[w.id for w in chosen])
    return Decision()


def _decide_static(waiting: list[Waiting], lanes: list[Lane], limits: Limits, now: float) -> Decision:
    busy = [lane for lane in lanes if lane.rows]
    if busy:
        return Decision(lane=busy[0].key)
    if not waiting:
        return Decision()
    overall = min(waiting, key=lambda w: w.submitted_at)
    if now - overall.submitted_at > limits.max_wait_s:
        candidates, oldest = waiting, overall
    else:
        interactive = [w for w in waiting if w.priority == INTERACTIVE]
        candidates = interactive or waiting
        oldest = min(candidates, key=lambda w: w.submitted_at)
    group = [w for w in candidates if w.adapter == oldest.adapter]
    rows = [Row(i, w.prompt_tokens, w.max_new_tokens, w.adapter) for i, w in enumerate(group)]
    target = group.index(oldest)
    planned = next(b for b in plan_batches(rows, limits.max_rows, limits.max_kv_tokens)
                   if any(r.index == target for r in b))
    return Decision(lane=oldest.key, admit=[group[r.index].id for r in planned])
