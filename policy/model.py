"""The policy file schema (version 1) as pydantic models.

Validation here is structural and per value (types, ranges, pattern syntax); the loader turns
pydantic's errors into messages with the file, line and key. Rule patterns are parsed once, by
the compiler, which reports their errors the same way.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyAddress, IPvAnyNetwork

Port = Annotated[int, Field(ge=1, le=65535)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkSettings(_Strict):
    default: Literal["allow", "deny", "ask"] = "ask"
    allow: list[str] = []
    deny: list[str] = []
    ports: list[Port] = Field(default=[80, 443], min_length=1)
    allow_ip_literals: bool = False
    block_private: bool = True
    allowed_cidrs: list[IPvAnyNetwork] = []


class ApprovalSettings(_Strict):
    timeout: float = Field(default=120.0, gt=0, le=86400)


class PolicyFile(_Strict):
    version: Literal[1]
    network: NetworkSettings = NetworkSettings()
    approvals: ApprovalSettings = ApprovalSettings()
    resolve: dict[str, IPvAnyAddress] = {}
