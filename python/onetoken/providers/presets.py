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


# Positional: name, title, vendor, protocol, base URL, region, retains content, trains on
# data; then what only some vendors have.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("openai", "OpenAI", "openai", "openai", "https://api.openai.com/v1", "us",
               True, False, tags=("soc2",), credential_env="OPENAI_API_KEY"),
        Preset("azure-openai", "Azure OpenAI", "microsoft", "azure", None, "",
               True, False, api_version="2024-10-21", tags=("soc2", "iso27001"),
               credential_env="AZURE_OPENAI_API_KEY"),
        Preset("anthropic", "Anthropic", "anthropic", "anthropic",
               "https://api.anthropic.com/v1", "us", True, False, api_version="2023-06-01",
               tags=("soc2",), credential_env="ANTHROPIC_API_KEY"),
        # Paid tier; the free tier's terms allow training.
        Preset("gemini", "Google Gemini", "google", "gemini",
               "https://generativelanguage.googleapis.com/v1beta", "us", True, False,
               tags=("soc2", "iso27001"), credential_env="GEMINI_API_KEY"),
        Preset("deepseek", "DeepSeek", "deepseek", "openai", "https://api.deepseek.com/v1",
               "cn-mainland", True, True, credential_env="DEEPSEEK_API_KEY"),
        Preset("qwen", "Alibaba Qwen (DashScope)", "alibaba", "openai",
               "https://dashscope.aliyuncs.com/compatible-mode/v1", "cn-mainland", True, False,
               credential_env="DASHSCOPE_API_KEY"),
        Preset("moonshot", "Moonshot AI (Kimi)", "moonshot", "openai",
               "https://api.moonshot.cn/v1", "cn-mainland", True, True,
               credential_env="MOONSHOT_API_KEY"),
        Preset("zhipu", "Zhipu AI (GLM)", "zhipu", "openai",
               "https://open.bigmodel.cn/api/paas/v4", "cn-mainland", True, True,
               credential_env="ZHIPUAI_API_KEY"),
        Preset("doubao", "ByteDance Doubao (Volcano Engine Ark)", "bytedance", "openai",
               "https://ark.cn-beijing.volces.com/api/v3", "cn-mainland", True, False,
               credential_env="ARK_API_KEY"),
        Preset("minimax", "MiniMax", "minimax", "openai", "https://api.minimax.chat/v1",
               "cn-mainland", True, True, credential_env="MINIMAX_API_KEY"),
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
