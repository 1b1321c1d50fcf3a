"""Presets for common vendors: public base URL, protocol and data-processing attributes.

The attributes are conservative defaults taken from each vendor's public API terms at
the time of writing (content kept for abuse monitoring counts as retained; a vendor whose
terms allow using API inputs to improve its services counts as training on data). They
are what org policies select on, so operators should check them against their own
agreement (enterprise contracts often grant zero retention) and override any field.
None of these endpoints is called by the tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    title: str
    vendor: str
    protocol: str
    # None: the URL names the customer's own resource (Azure); it must be given.
    base_url: str | None
    region: str
    retains_content: bool
    trains_on_data: bool
    zero_retention: bool = False
    api_version: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    # The environment variable operators usually keep this vendor's key in.
    credential_env: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tags"] = list(self.tags)
        return out


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="openai",
            title="OpenAI",
            vendor="openai",
            protocol="openai",
            base_url="https://api.openai.com/v1",
            region="us",
            retains_content=True,
            trains_on_data=False,
            tags=("soc2",),
            credential_env="OPENAI_API_KEY",
        ),
        Preset(
            name="azure-openai",
            title="Azure OpenAI",
            vendor="microsoft",
            protocol="azure",
            base_url=None,
            region="",
            retains_content=True,
            trains_on_data=False,
            api_version="2024-10-21",
            tags=("soc2", "iso27001"),
            credential_env="AZURE_OPENAI_API_KEY",
        ),
        Preset(
            name="anthropic",
            title="Anthropic",
            vendor="anthropic",
            protocol="anthropic",
            base_url="https://api.anthropic.com/v1",
            region="us",
            retains_content=True,
            trains_on_data=False,
            api_version="2023-06-01",
            tags=("soc2",),
            credential_env="ANTHROPIC_API_KEY",
        ),
        Preset(
            name="gemini",
            title="Google Gemini",
            vendor="google",
            protocol="gemini",
            base_url="https://generativelanguage.googleapis.com/v1beta",
            region="us",
            retains_content=True,
            # Paid tier; the free tier's terms allow training.
            trains_on_data=False,
            tags=("soc2", "iso27001"),
            credential_env="GEMINI_API_KEY",
        ),
        Preset(
            name="deepseek",
            title="DeepSeek",
            vendor="deepseek",
            protocol="openai",
            base_url="https://api.deepseek.com/v1",
            region="cn-mainland",
            retains_content=True,
            trains_on_data=True,
            credential_env="DEEPSEEK_API_KEY",
        ),
        Preset(
            name="qwen",
            title="Alibaba Qwen (DashScope)",
            vendor="alibaba",
            protocol="openai",
            base_url="https://dashscope.aliyuncs.com/compatible-mode/v1",
            region="cn-mainland",
            retains_content=True,
            trains_on_data=False,
            credential_env="DASHSCOPE_API_KEY",
        ),
        Preset(
            name="moonshot",
            title="Moonshot AI (Kimi)",
            vendor="moonshot",
            protocol="openai",
            base_url="https://api.moonshot.cn/v1",
            region="cn-mainland",
            retains_content=True,
            trains_on_data=True,
            credential_env="MOONSHOT_API_KEY",
        ),
        Preset(
            name="zhipu",
            title="Zhipu AI (GLM)",
            vendor="zhipu",
            protocol="openai",
            base_url="https://open.bigmodel.cn/api/paas/v4",
            region="cn-mainland",
            retains_content=True,
            trains_on_data=True,
            credential_env="ZHIPUAI_API_KEY",
        ),
        Preset(
            name="doubao",
            title="ByteDance Doubao (Volcano Engine Ark)",
            vendor="bytedance",
            protocol="openai",
            base_url="https://ark.cn-beijing.volces.com/api/v3",
            region="cn-mainland",
            retains_content=True,
            trains_on_data=False,
            credential_env="ARK_API_KEY",
        ),
        Preset(
            name="minimax",
            title="MiniMax",
            vendor="minimax",
            protocol="openai",
            base_url="https://api.minimax.chat/v1",
            region="cn-mainland",
            retains_content=True,
            trains_on_data=True,
            credential_env="MINIMAX_API_KEY",
        ),
    )
}

# Fields a preset fills in when the provider does not give them.
PRESET_FIELDS = (
    "vendor",
    "protocol",
    "base_url",
    "region",
    "retains_content",
    "trains_on_data",
    "zero_retention",
    "api_version",
    "tags",
)


def apply_preset(preset_name: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """`given` with every field it lacks (absent or None) filled from the preset."""
    if preset_name is None:
        return dict(given)
    preset = PRESETS[preset_name].as_dict()
    out = dict(given)
    for name in PRESET_FIELDS:
        if out.get(name) is None and preset[name] is not None:
            out[name] = preset[name]
    return out
