"""The simulator's `/mj/submit/*` handlers: new tasks (imagine, describe, blend, ...), follow-ups
of a finished task (buttons, change, simple-change), the remix modal, answering each flavour's
codes (1 ok, 21 modal, 3 no such task, 4 bad state, 24 banned prompt) as the upstream does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import responses as r
from .lifecycle import INSTANCE_ID, SimTask, action_for_custom_id, banned_word, outcome_for_prompt
from .render import NZ_LACKS

if TYPE_CHECKING:
    from .app import Simulator


class Submit:
    """The submit handlers of one Simulator; each takes the request's JSON object."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def routes(self) -> list[tuple[str, r.ObjectHandler]]:
        """(path, handler) of every submit endpoint the flavour serves (all POST)."""
        other = self._submit_other
        found: list[tuple[str, r.ObjectHandler]] = [
            ("/mj/submit/imagine", self._imagine),
            ("/mj/submit/change", self._change),
            ("/mj/submit/simple-change", self._simple_change),
            ("/mj/submit/describe", other),
            ("/mj/submit/blend", other),
        ]
        if (
            self.sim.flavor == "nz"
        ):  # the rest (buttons, modal, shorten, video, face swap) is plus-only
            return found
        return [
            *found,
            ("/mj/submit/modal", self._submit_modal),
            ("/mj/submit/action", self._action),
            ("/mj/submit/shorten", other),
            ("/mj/submit/video", other),
            ("/mj/submit/edits", other),
            ("/mj/submit/upload-discord-images", self._upload),
            ("/mj/insight-face/swap", other),
        ]

    def _submitted(self, task: SimTask) -> web.Response:
        props: dict[str, Any] = {"discordInstanceId": INSTANCE_ID}
        if task.status == "MODAL":
            code = 21
            if self.sim.flavor == "trueai":
                props = {"finalPrompt": task.final_prompt, "remix": True}
            # new-api turns "waiting for window" into a plain success, except for the two
            # actions whose modal the client must fill in itself.
            elif self.sim.flavor == "new-api" and task.action not in ("INPAINT", "CUSTOM_ZOOM"):
                code = 1
            return r.json_response(
                {"code": code, "description": "窗口等待", "result": task.id, "properties": props}
            )
        body = {"code": 1, "description": "Submit success", "result": task.id, "properties": props}
        return r.json_response(body)

    def _fail(self, code: int, description: str, **properties: Any) -> web.Response:
        body = {"code": code, "description": description, "result": None, "properties": properties}
        return r.json_response(body)

    def _create(
        self,
        data: dict[str, Any],
        prompt: str,
        *,
        action: str = "IMAGINE",
        outcome: str = "success",
    ) -> web.Response:
        """A new task from a submit, with the body's notifyHook (not on new-api) and state."""
        hook, state = data.get("notifyHook"), data.get("state")
        task_id = self.sim.add_task(
            prompt,
            notify_hook=hook
            if isinstance(hook, str) and hook and self.sim.flavor != "new-api"
            else None,
            state=state if isinstance(state, str) else None,
            action=action,
            outcome=outcome,
        )
        return self._submitted(self.sim._tasks[task_id])

    async def _imagine(self, data: dict[str, Any], request: web.Request) -> web.Response:
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return self._fail(4, "prompt不能为空")
        word = banned_word(prompt)
        if word is not None:
            return self._fail(24, "可能包含敏感词", promptEn=prompt, bannedWord=word)
        outcome = outcome_for_prompt(prompt)
        if self.sim.flavor == "nz" and outcome in NZ_LACKS:
            outcome = "success"  # no remix window, no cancel: the words mean nothing to nz
        return self._create(data, prompt, outcome=outcome)

    async def _submit_modal(self, data: dict[str, Any], request: web.Request) -> web.Response:
        task = self.sim._tasks.get(str(data.get("taskId") or ""))
        if task is None:
            return self._fail(3, "关联任务不存在或已失效")
        prompt = data.get("prompt")
        if not self.sim.modal(task.id, prompt if isinstance(prompt, str) else None):
            return self._fail(4, "关联任务状态错误")
        return self._submitted(task)

    def _follow_up(
        self, data: dict[str, Any], parent_id: object, action: str, modal: bool
    ) -> web.Response:
        parent = self.sim._tasks.get(str(parent_id or ""))
        if parent is None:
            return self._fail(3, "关联任务不存在或已失效")
        if parent.status != "SUCCESS":
            return self._fail(4, "关联任务状态错误")
        return self._create(
            data, parent.prompt, action=action, outcome="modal" if modal else "success"
        )

    async def _action(self, data: dict[str, Any], request: web.Request) -> web.Response:
        custom_id = data.get("customId")
        if not isinstance(custom_id, str) or not custom_id:
            return self._fail(4, "customId不能为空")
        action, modal = action_for_custom_id(custom_id)
        return self._follow_up(data, data.get("taskId"), action, modal)

    async def _change(self, data: dict[str, Any], request: web.Request) -> web.Response:
        action = data.get("action")
        if action not in ("UPSCALE", "VARIATION", "REROLL"):
            return self._fail(4, "action参数错误")
        return self._follow_up(data, data.get("taskId"), str(action), False)

    async def _simple_change(self, data: dict[str, Any], request: web.Request) -> web.Response:
        parts = str(data.get("content") or "").split()
        actions = {"U": "UPSCALE", "V": "VARIATION", "R": "REROLL"}
        if len(parts) != 2 or not parts[1] or parts[1][0].upper() not in actions:
            return self._fail(4, "content参数错误")
        return self._follow_up(data, parts[0], actions[parts[1][0].upper()], False)

    async def _submit_other(self, data: dict[str, Any], request: web.Request) -> web.Response:
        kind = request.path.rsplit("/", 1)[-1]
        action = {"swap": "SWAP_FACE", "edits": "EDIT"}.get(kind, kind.upper())
        prompt = data.get("prompt")
        if kind == "blend":
            images = data.get("base64Array")
            if not isinstance(images, list) or len(images) < 2:
                return self._fail(4, "base64List参数错误")
        elif kind == "describe" and not data.get("base64"):
            return self._fail(4, "base64不能为空")
        elif kind == "shorten" and not (isinstance(prompt, str) and prompt.strip()):
            return self._fail(4, "prompt不能为空")
        return self._create(data, prompt if isinstance(prompt, str) else "", action=action)

    async def _upload(self, data: dict[str, Any], request: web.Request) -> web.Response:
        images = data.get("base64Array")
        count = len(images) if isinstance(images, list) else 0
        urls = [
            f"https://cdn.discordapp.com/ephemeral-attachments/1/{i}/image.png"
            for i in range(count)
        ]
        return r.json_response({"code": 1, "description": "成功", "result": urls, "properties": {}})
