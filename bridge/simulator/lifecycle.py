"""The simulator's tasks and how they move: NOT_START -> SUBMITTED -> IN_PROGRESS -> a terminal
status, one step per tick, every random choice drawn from one seeded RNG. No I/O, no flavour:
`render.py` turns a SimTask into the JSON each upstream serves.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

OUTCOMES = ("success", "failure", "modal", "cancel", "banned", "timeout")

# Failure texts as midjourney-proxy writes them: "[<embed title>] <embed description>",
# "Failed ..." for interaction errors, "任务超时" from the timeout scheduler.
FAIL_INVALID = "[Invalid parameter] Invalid aspect ratio"
FAIL_BANNED = (
    "[Banned prompt detected] Sorry! Our AI moderator thinks this prompt is probably against "
    "our community standards."
)
FAIL_TIMEOUT = "任务超时"
FAIL_REASONS = (
    FAIL_INVALID,
    "[Invalid parameter] Unrecognized parameter(s): `--foo`",
    "Failed to submit interaction: 429 Too Many Requests",
    "[Internal Server Error] An unexpected error occurred",
    "[Job action restricted] Can't run this job: Out of fast hours",
)
FAIL_CANCELLED_TA = "取消任务"

# Words the simulator's "moderator" refuses at submit time (code 24).
BANNED_WORDS = ("nsfw", "gore", "banned")

DISCORD_EPOCH_MS = 1420070400000
INSTANCE_ID = "1118138338562560102"
# Where image URLs point: Discord's CDN path shape, served by the simulator itself once it
# listens (Simulator.start sets `Lifecycle.cdn`), so a bridge that downloads images
# (`attach_image`) never leaves the machine.
CDN = "https://cdn.discordapp.com/attachments/1050703772185268251"
CHANNEL = "1050703772185268251"
BOT_USER = "1050702627576483930"

# A plan is the list of transitions a task will make, one per tick.
Step = tuple[Literal["submit", "progress", "success", "failure", "cancel", "stall"], Any]


@dataclass(slots=True, eq=False)
class SimTask:
    """One upstream task. Mutated only through `Lifecycle`, which bumps `version` and clears the
    rendered-bytes `cache` on every change. Compared by identity."""

    id: str
    action: str
    prompt: str
    outcome: str
    status: str
    submit_time: int
    notify_hook: str | None
    state: str | None
    message_hash: str
    nonce: str
    seed: str
    plan: list[Step] = field(default_factory=list)
    start_time: int | None = None
    finish_time: int | None = None
    progress: str | None = None
    image_url: str | None = None
    fail_reason: str | None = None
    progress_message_id: str | None = None
    message_id: str | None = None
    version: int = 0
    cache: dict[str, bytes] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in ("SUCCESS", "FAILURE", "CANCEL")

    @property
    def final_prompt(self) -> str:
        return self.prompt if "--v" in self.prompt else f"{self.prompt} --v 7.0"

    @property
    def description(self) -> str:
        match self.action:
            case "IMAGINE":
                return f"/imagine {self.prompt}"
            case "DESCRIBE" | "BLEND" | "SHORTEN":
                return f"/{self.action.lower()} {self.id}"
            case _:
                return f"/{self.action.lower()} {self.prompt}"


class Lifecycle:
    """Creates tasks and advances them. `on_change(task)` is called after every change."""

    def __init__(self, seed: int = 0) -> None:
        self.cdn = CDN
        self.rng = random.Random(seed)
        self._last_ms = 0
        self._oldest_ms: int | None = None

    # ids and Discord-looking values ---------------------------------------------------------

    def next_ms(self) -> int:
        ms = max(int(time.time() * 1000), self._last_ms + 1)
        self._last_ms = ms
        if self._oldest_ms is None:
            self._oldest_ms = ms
        return ms

    def older_ms(self, count: int, spacing: int) -> int:
        """The first of `count` timestamps `spacing` ms apart, all before every existing task."""
        oldest = self._oldest_ms if self._oldest_ms is not None else int(time.time() * 1000)
        first = oldest - count * spacing
        self._oldest_ms = first
        if self._last_ms == 0:
            self._last_ms = oldest
        return first

    def task_id(self, ms: int) -> str:
        return f"{ms}{self.rng.randrange(1000):03d}"

    def snowflake(self, ms: int | None = None) -> str:
        ms = int(time.time() * 1000) if ms is None else ms
        return str(((ms - DISCORD_EPOCH_MS) << 22) | self.rng.getrandbits(22))

    def message_hash(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def progress_values(self, steps: int) -> list[int]:
        if steps <= 0:
            return []
        return sorted(self.rng.sample(range(1, 100), min(steps, 99)))

    # creation --------------------------------------------------------------------------------

    def new_task(
        self,
        prompt: str,
        *,
        action: str = "IMAGINE",
        outcome: str = "success",
        steps: int = 4,
        notify_hook: str | None = None,
        state: str | None = None,
        task_id: str | None = None,
        fail_reason: str | None = None,
        submit_ms: int | None = None,
    ) -> SimTask:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
        ms = self.next_ms() if submit_ms is None else submit_ms
        task = SimTask(
            id=task_id or self.task_id(ms),
            action=action,
            prompt=prompt,
            outcome=outcome,
            status="MODAL" if outcome == "modal" else "NOT_START",
            submit_time=ms,
            notify_hook=notify_hook,
            state=state,
            message_hash=self.message_hash(),
            nonce=self.snowflake(ms),
            seed=str(self.rng.randrange(1, 4294967295)),
        )
        if outcome != "modal":
            task.plan = self.plan(outcome, steps, fail_reason)
        return task

    def plan(self, outcome: str, steps: int, fail_reason: str | None = None) -> list[Step]:
        """The transitions after NOT_START. `steps` counts the IN_PROGRESS updates of a
        successful run; failures stop half-way, cancels and timeouts after the first update."""
        values = self.progress_values(steps)
        submit: list[Step] = [("submit", None)]
        match outcome:
            case "success" | "modal":
                return [*submit, *(("progress", v) for v in values), ("success", None)]
            case "failure":
                half = values[: (len(values) + 1) // 2]
                reason = fail_reason or FAIL_INVALID
                return [*submit, *(("progress", v) for v in half), ("failure", reason)]
            case "banned":
                return [*submit, ("failure", fail_reason or FAIL_BANNED)]
            case "cancel":
                return [*submit, *(("progress", v) for v in values[:1]), ("cancel", None)]
            case "timeout":
                stalls: list[Step] = [("stall", None)] * max(steps, 1)
                first: list[Step] = [("progress", v) for v in values[:1]]
                return [*submit, *first, *stalls, ("failure", fail_reason or FAIL_TIMEOUT)]
        raise ValueError(f"unknown outcome {outcome!r}")

    def finished_task(self, prompt: str, submit_ms: int) -> SimTask:
        """An old finished task built in one go (for bulk seeding): mostly SUCCESS, some FAILURE."""
        failed = self.rng.random() < 0.1
        task = self.new_task(
            prompt, outcome="failure" if failed else "success", steps=0, submit_ms=submit_ms
        )
        task.plan = []
        task.start_time = submit_ms + 900 + self.rng.randrange(2000)
        task.finish_time = task.start_time + 20_000 + self.rng.randrange(40_000)
        if failed:
            task.status = "FAILURE"
            task.progress = ""
            task.fail_reason = self.rng.choice(FAIL_REASONS)
        else:
            task.status = "SUCCESS"
            task.progress = "100%"
            task.message_id = self.snowflake(task.finish_time)
            task.image_url = self.image_url(task, "png", task.finish_time)
        return task

    # transitions -------------------------------------------------------------------------------

    def advance(self, task: SimTask) -> bool:
        """Apply the next planned step; returns whether the task changed."""
        if not task.plan:
            return False
        kind, arg = task.plan.pop(0)
        now = int(time.time() * 1000)
        match kind:
            case "submit":
                task.status = "SUBMITTED"
                task.progress = "0%"
                task.start_time = now
            case "progress":
                task.status = "IN_PROGRESS"
                task.progress = f"{arg}%"
                if task.progress_message_id is None:
                    task.progress_message_id = self.snowflake(now)
                task.image_url = self.image_url(task, "webp", now)
            case "success":
                task.status = "SUCCESS"
                task.progress = "100%"
                task.finish_time = now
                task.message_id = self.snowflake(now)
                task.progress_message_id = None
                task.image_url = self.image_url(task, "png", now)
            case "failure":
                self.fail(task, str(arg), now)
            case "cancel":
                task.status = "CANCEL"
                task.finish_time = now
                task.plan = []
            case "stall":
                return False
        task.version += 1
        task.cache.clear()
        return True

    def fail(self, task: SimTask, reason: str, now: int | None = None) -> None:
        task.status = "FAILURE"
        task.progress = ""
        task.fail_reason = reason
        task.finish_time = int(time.time() * 1000) if now is None else now
        task.plan = []
        task.version += 1
        task.cache.clear()

    def cancel(self, task: SimTask) -> None:
        task.status = "CANCEL"
        task.finish_time = int(time.time() * 1000)
        task.plan = []
        task.version += 1
        task.cache.clear()

    def submit_modal(self, task: SimTask, prompt: str | None, steps: int = 4) -> None:
        """/mj/submit/modal: the MODAL task joins the queue and then runs to success."""
        if prompt:
            task.prompt = prompt
        task.status = "NOT_START"
        task.outcome = "success"
        task.plan = self.plan("success", steps)
        task.version += 1
        task.cache.clear()

    def image_url(self, task: SimTask, ext: str, ms: int) -> str:
        words = re.findall(r"[a-z0-9]+", task.prompt.lower().split("--")[0])[:6]
        slug = "_".join(words) or "image"
        return f"{self.cdn}/{self.snowflake(ms)}/simuser_{slug}_{task.message_hash}.{ext}"


def banned_word(prompt: str) -> str | None:
    lowered = prompt.lower()
    return next((w for w in BANNED_WORDS if re.search(rf"\b{w}\b", lowered)), None)


def outcome_for_prompt(prompt: str) -> str:
    """How a task submitted over HTTP will end, steered by words in its prompt: an impossible
    aspect ratio fails, "modal"/"remix" waits for /mj/submit/modal, "timeout" and "cancel" do
    what they say; anything else succeeds."""
    lowered = prompt.lower()
    if "--ar 1:1:1" in lowered or "invalid" in lowered:
        return "failure"
    for word, outcome in (("modal", "modal"), ("remix", "modal"), ("timeout", "timeout")):
        if word in lowered:
            return outcome
    if "cancel" in lowered:
        return "cancel"
    return "success"


def buttons(task: SimTask) -> list[dict[str, Any]]:
    """The Discord components a finished task carries, as plus/trueai copy them."""
    h = task.message_hash

    def button(custom_id: str, label: str = "", emoji: str = "") -> dict[str, Any]:
        return {"customId": custom_id, "emoji": emoji, "label": label, "type": 2, "style": 2}

    match task.action:
        case "UPSCALE":
            return [
                button(f"MJ::JOB::upsample_v6_2x_subtle::1::{h}::SOLO", "Upscale (Subtle)"),
                button(f"MJ::JOB::upsample_v6_2x_creative::1::{h}::SOLO", "Upscale (Creative)"),
                button(f"MJ::JOB::low_variation::1::{h}::SOLO", "Vary (Subtle)"),
                button(f"MJ::JOB::high_variation::1::{h}::SOLO", "Vary (Strong)"),
                button(f"MJ::Inpaint::1::{h}::SOLO", "Vary (Region)"),
                button(f"MJ::Outpaint::50::1::{h}::SOLO", "Zoom Out 2x"),
                button(f"MJ::Outpaint::75::1::{h}::SOLO", "Zoom Out 1.5x"),
                button(f"MJ::CustomZoom::{h}", "Custom Zoom"),
                button(f"MJ::JOB::pan_left::1::{h}::SOLO", emoji="⬅️"),
                button(f"MJ::JOB::pan_right::1::{h}::SOLO", emoji="➡️"),
                button(f"MJ::JOB::pan_up::1::{h}::SOLO", emoji="⬆️"),
                button(f"MJ::JOB::pan_down::1::{h}::SOLO", emoji="⬇️"),
            ]
        case "DESCRIBE":
            return [
                *(button(f"MJ::Job::PicReader::{i}", str(i)) for i in range(1, 5)),
                button("MJ::Picread::Retry", emoji="🔄"),
                button("MJ::Job::PicReader::all", "Imagine all", "🎉"),
            ]
        case "SHORTEN" | "SWAP_FACE" | "VIDEO":
            return []
    return [
        *(button(f"MJ::JOB::upsample::{i}::{h}", f"U{i}") for i in range(1, 5)),
        button(f"MJ::JOB::reroll::0::{h}::SOLO", emoji="🔄"),
        *(button(f"MJ::JOB::variation::{i}::{h}", f"V{i}") for i in range(1, 5)),
    ]


def action_for_custom_id(custom_id: str) -> tuple[str, bool]:
    """(action, needs_modal) for a button's customId, as plus maps them."""
    for key, action in (
        ("CustomZoom", "CUSTOM_ZOOM"),
        ("Inpaint", "INPAINT"),
        ("PicReader", "IMAGINE"),
    ):
        if key in custom_id:
            return action, True
    for key, action in (
        ("upsample", "UPSCALE"),
        ("variation", "VARIATION"),
        ("reroll", "REROLL"),
        ("pan_", "PAN"),
        ("Outpaint", "ZOOM"),
    ):
        if key in custom_id:
            return action, False
    return "ACTION", False
