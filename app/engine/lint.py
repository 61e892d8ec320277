"""Platform rules as lint: warnings, not errors, about what WeChat's rules for shared links
forbid, so a marketer learns it before the platform restricts the account.

WeChat's external-link rules (微信外部链接内容管理规范) forbid inducing users to share, like
or "help" for a reward: 集赞 (collect likes), 助力 (friends tap to help), 砍价-style "help
me bargain", and rewards for sharing to Moments or groups; they also require group-buy terms
to be clear. A funnel whose rewards are triggered by such events, or a group-buy campaign
with no stated end, gets a warning with the JSON path at fault. The names are read from the
event: a custom `post.liked`, `share.completed` or `bargain.helped` all count.
"""

from __future__ import annotations

import re
from typing import Any

from app.engine import definition as d
from app.engine.paths import format_path
from app.errors import FieldProblem

# Event names that are a share, a like, or a friend's "help" (English or pinyin).
INDUCED = re.compile(
    r"(^|[._])(share[sd]?|shar(ed|ing)|like[sd]?|liked|jizan|zan|help(ed)?|assist(ed)?|"
    r"zhuli|bargain(ed)?|kanjia|forward(ed)?|repost(ed)?|moments)($|[._])"
)
REWARD_ACTIONS = frozenset({"grant_points", "issue_voucher", "pay_red_packet"})
RULE = (
    "WeChat's rules for shared links forbid rewards for sharing, liking or helping "
    "(集赞, 助力, 砍价); the account can be restricted"
)


def induced(event: str | None) -> bool:
    return bool(event and INDUCED.search(event))


def _rewarding(actions: Any) -> bool:
    return any(
        a.type in REWARD_ACTIONS
        or (a.type == "call_mechanic" and a.mechanic.startswith("rewards."))
        for a in actions
    )


def platform_warnings(funnel: d.FunnelDefinition) -> list[FieldProblem]:
    out: list[FieldProblem] = []
    for i, t in enumerate(funnel.transitions):
        if not induced(t.event):
            continue
        if _rewarding(t.actions):
            out.append(
                FieldProblem(
                    format_path(["transitions", i, "actions"]),
                    f'a reward on "{t.event}": {RULE}',
                )
            )
        elif _rewarding(funnel.states[t.to].on_enter) if t.to in funnel.states else False:
            out.append(
                FieldProblem(
                    format_path(["transitions", i, "event"]),
                    f'"{t.event}" leads to state "{t.to}", whose on_enter rewards: {RULE}',
                )
            )
    for name, r in funnel.mechanics.referral.items():
        if induced(r.qualify_event):
            out.append(
                FieldProblem(
                    format_path(["mechanics", "referral", name, "qualify_event"]),
                    f'rewards paid when an invitee "{r.qualify_event}": {RULE}',
                )
            )
    for name, g in funnel.mechanics.groupbuy.items():
        if g.ends_at is None:
            out.append(
                FieldProblem(
                    format_path(["mechanics", "groupbuy", name, "ends_at"]),
                    "WeChat requires clear group-buy terms: state when the offer ends",
                )
            )
    return out
