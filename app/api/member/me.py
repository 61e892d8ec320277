from __future__ import annotations

from fastapi import APIRouter

from app.api.admin.members import MemberPublic, public
from app.api.deps import MemberDep
from app.problems import responses

router = APIRouter(prefix="/v1/member", tags=["member (mini-program)"], responses=responses(401))


@router.get("/me")
def me(member: MemberDep) -> MemberPublic:
    return public(member)
