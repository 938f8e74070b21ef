"""How each upstream flavour serialises a simulator task: midjourney-proxy/plus (Jackson, nulls
included, NZ field order, plus's `buttons`), nz (the open-source 2.x: the same without `buttons`),
trueai (System.Text.Json camelCase with its many extra fields) and the new-api relay DTO.
Bytes are cached per task until it changes, so a 100k-task list stays cheap.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from .lifecycle import BOT_USER, INSTANCE_ID, SimTask, buttons

# midjourney-proxy is the closed-source "plus" server; nz is the open-source novicezk 2.x.
FLAVORS = ("midjourney-proxy", "nz", "trueai", "new-api")
ALIASES = {"plus": "midjourney-proxy"}
# Outcomes nz cannot produce: it has no MODAL window and no CANCEL status.
NZ_LACKS = ("modal", "cancel")


def canonical_flavor(flavor: str) -> str:
    name = ALIASES.get(flavor, flavor)
    if name not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r}; expected one of {(*FLAVORS, 'plus')}")
    return name


def _started(task: SimTask) -> bool:
    return task.status not in ("NOT_START", "MODAL")


def nz_properties(task: SimTask, hook: str | None) -> dict[str, Any]:
    props: dict[str, Any] = {
        "discordInstanceId": INSTANCE_ID,
        "botType": "MID_JOURNEY",
        "notifyHook": hook,
        "nonce": task.nonce,
    }
    if task.progress_message_id is not None:
        props["progressMessageId"] = task.progress_message_id
    if _started(task):
        props["finalPrompt"] = task.final_prompt
    if task.progress_message_id is not None or task.status == "SUCCESS":
        props["messageHash"] = task.message_hash
    if task.status == "SUCCESS":
        props["flags"] = 0
        props["messageId"] = task.message_id
        props["messageContent"] = f"**{task.final_prompt}** - <@{BOT_USER}> (fast)"
    return props


def render_nz(task: SimTask, hook: str | None, *, plus: bool = True) -> dict[str, Any]:
    """NZ's getter order, nulls included; plus (midjourney-proxy) adds `buttons`."""
    data: dict[str, Any] = {
        "id": task.id,
        "properties": nz_properties(task, hook),
        "action": task.action,
        "status": task.status,
        "prompt": task.prompt,
        "promptEn": task.prompt,
        "description": task.description,
        "state": task.state,
        "submitTime": task.submit_time,
        "startTime": task.start_time,
        "finishTime": task.finish_time,
        "imageUrl": task.image_url,
        "progress": task.progress,
        "failReason": task.fail_reason,
    }
    if plus:
        data["buttons"] = buttons(task) if task.status == "SUCCESS" else []
    return data


def render_ta(task: SimTask, hook: str | None) -> dict[str, Any]:
    """trueai: camelCase, enums as strings, nulls included; the in-progress preview is not kept
    (EnableSaveIntermediateImage defaults to false), so imageUrl stays null until SUCCESS."""
    success = task.status == "SUCCESS"
    image = task.image_url if success else None
    message_ids = [m for m in (task.progress_message_id, task.message_id) if m]
    props = nz_properties(task, hook)
    props["discordChannelId"] = INSTANCE_ID
    return {
        "id": task.id,
        "parentId": None,
        "botType": "MID_JOURNEY",
        "realBotType": "MID_JOURNEY" if _started(task) else None,
        "userId": None,
        "isWhite": False,
        "nonce": task.nonce,
        "interactionMetadataId": None,
        "messageId": task.message_id,
        "remixModalMessageId": None,
        "remixAutoSubmit": False,
        "remixModaling": task.status == "MODAL",
        "instanceId": INSTANCE_ID,
        "subInstanceId": None,
        "messageIds": message_ids,
        "action": task.action,
        "status": task.status,
        "prompt": task.prompt,
        "promptEn": task.prompt,
        "promptFull": task.final_prompt if _started(task) else None,
        "description": task.description,
        "state": task.state,
        "submitTime": task.submit_time,
        "startTime": task.start_time,
        "finishTime": task.finish_time,
        "imageUrl": image,
        "imageUrls": [{"url": image, "thumbnail": image}] if image else [],
        "thumbnailUrl": image,
        "videoUrl": None,
        "videoUrls": [],
        "progress": task.progress,
        "failReason": task.fail_reason,
        "buttons": buttons(task) if success else [],
        "displays": {
            "status": task.status,
            "submitTime": _ts(task.submit_time),
            "startTime": _ts(task.start_time),
            "finishTime": _ts(task.finish_time),
            "action": task.action,
            "discordInstanceId": INSTANCE_ID,
        },
        "seed": task.seed if success else None,
        "seedMessageId": None,
        "seedError": None,
        "clientIp": "127.0.0.1",
        "jobId": task.message_hash if success else None,
        "isReplicate": False,
        "replicateSource": None,
        "replicateTarget": None,
        "mode": "FAST",
        "requestMode": None,
        "accountFilter": None,
        "width": 1024 if success else None,
        "height": 1024 if success else None,
        "imageWidth": 2048 if success else None,
        "imageHeight": 2048 if success else None,
        "version": "7",
        "useTime": None,
        "isCompleted": task.finished,
        "properties": props,
    }


def render_new_api(task: SimTask, base_url: str) -> dict[str, Any]:
    """new-api's MidjourneyDto read from its own DB: Go zero values instead of nulls, a fresh row
    is status "" / "0%", FAILURE rows read "100%", imageUrl points at new-api's image proxy."""
    image = f"{base_url}/mj/image/{task.id}"
    if task.status != "SUCCESS":
        image += f"?rand={time.time_ns()}"
    status = "" if task.status == "NOT_START" else task.status
    progress = task.progress or ""
    if task.status == "NOT_START":
        progress = "0%"
    elif task.status == "FAILURE":
        progress = "100%"
    return {
        "id": task.id,
        "action": task.action,
        "customId": "",
        "botType": "",
        "prompt": task.prompt,
        "promptEn": task.prompt,
        "description": task.description,
        "state": task.state or "",
        "submitTime": task.submit_time,
        "startTime": task.start_time or 0,
        "finishTime": task.finish_time or 0,
        "imageUrl": image,
        "videoUrl": "",
        "videoUrls": None,
        "status": status,
        "progress": progress,
        "failReason": task.fail_reason or "",
        "buttons": buttons(task) if task.status == "SUCCESS" else (None if not status else []),
        "maskBase64": "",
        "properties": {"finalPrompt": task.final_prompt, "finalZhPrompt": ""},
    }


def render(task: SimTask, flavor: str, *, hook: str | None, base_url: str) -> dict[str, Any]:
    match flavor:
        case "trueai":
            return render_ta(task, hook)
        case "new-api":
            return render_new_api(task, base_url)
        case "nz":
            return render_nz(task, hook, plus=False)
    return render_nz(task, hook)


def task_bytes(task: SimTask, flavor: str, *, hook: str | None, base_url: str) -> bytes:
    """The task's JSON as `flavor` serves it, cached until the task changes. new-api rows that are
    not SUCCESS carry a fresh `?rand=` every time, so they are rendered on each request."""
    cached = task.cache.get(flavor)
    if cached is not None:
        return cached
    data = orjson.dumps(render(task, flavor, hook=hook, base_url=base_url))
    if flavor != "new-api" or task.status == "SUCCESS":
        task.cache[flavor] = data
    return data


def _ts(ms: int | None) -> str | None:
    if ms is None:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))
