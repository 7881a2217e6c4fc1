"""Request bodies, validated strictly: unknown fields and wrongly typed values are errors.

JSON bodies are validated in pydantic's strict mode (``"n": "2"`` is an error, not 2); multipart
form fields arrive as strings and are validated in lax mode (``n=2`` in a form is the number 2).
Every BAGEL knob keeps its official name (``cfg_text_scale``, ``cfg_interval``, ...); a knob left
out takes the engine's default for the task (they differ between text to image and editing).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bagel_engine.params import RENORM_TYPES

RenormType = Literal[RENORM_TYPES]  # type: ignore[valid-type]
OutputFormat = Literal["png", "jpeg", "webp"]

# Fields of the image knobs, in the engine's keyword names.
IMAGE_KNOBS = ("cfg_text_scale", "cfg_img_scale", "cfg_interval", "cfg_renorm_type", "cfg_renorm_min",
               "timestep_shift", "num_timesteps", "negative_prompt")
THINK_KNOBS = ("max_think_token_n", "do_sample", "text_temperature")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class BagelKnobs(Strict):
    """The knobs of the official ``interleave_inference``, by their official names."""

    think: bool = False
    seed: int | None = Field(None, ge=0, lt=2**63, description="same seed, same image (official noise draws)")
    cfg_text_scale: float | None = Field(None, ge=0)
    cfg_img_scale: float | None = Field(None, ge=0)
    cfg_interval: list[float] | None = Field(None, min_length=2, max_length=2, description="[low, high]")
    cfg_renorm_type: RenormType | None = None
    cfg_renorm_min: float | None = Field(None, ge=0, le=1)
    timestep_shift: float | None = Field(None, gt=0)
    num_timesteps: int | None = Field(None, ge=2)
    negative_prompt: str | None = Field(None, description="what the picture should not show (empty: none)")
    max_think_token_n: int | None = Field(None, ge=1)
    do_sample: bool | None = None
    text_temperature: float | None = Field(None, gt=0)

    @field_validator("cfg_interval")
    @classmethod
    def _interval(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not (0.0 <= v[0] <= v[1] <= 1.0):
            raise ValueError("must be [low, high] with 0 <= low <= high <= 1")
        return v

    def given(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The knobs among ``names`` the request set (the engine's defaults fill the rest)."""
        out = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        if "cfg_interval" in out:
            out["cfg_interval"] = tuple(out["cfg_interval"])
        return out


def _non_empty(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return v


class ImageRequest(BagelKnobs):
    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1)
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json (inline) or url (served by this server for a bounded time: --url-ttl)")
    output_format: OutputFormat | None = None
    user: str | None = Field(None, description="an end-user id (OpenAI field); accepted, does not change the result")

    stream: bool | None = Field(None, description="server-sent events: partial images, then the completed one")
    partial_images: int | None = Field(None, ge=0, le=3, description="previews sent while drawing (with stream)")

    _prompt = field_validator("prompt")(_non_empty)

    @model_validator(mode="after")
    def _stream_rules(self) -> "ImageRequest":
        if self.partial_images is not None and not self.stream:
            raise ValueError("'partial_images' applies only with stream: true")
        if self.stream and self.n != 1:
            raise ValueError("stream: true draws one image (n = 1)")
        return self


class ImageGenerationRequest(ImageRequest):
    size: str | None = Field(None, description="WxH, e.g. 1024x1024, or auto")


class ImageEditRequest(ImageRequest):
    size: Literal["auto"] | None = Field(
        None, description="only 'auto': the output takes the size of the last input image (resized as the model needs)"
    )

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if v is not None and v != "auto":
            raise ValueError(
                "only 'auto' is supported for edits: the output takes the size of the last input image, "
                "resized the way the model needs"
            )
        return v


class ImageEditJSONRequest(ImageEditRequest):
    image: list[str] = Field(min_length=1, description="data: URL(s) of the input image(s); one string or a list")

    @field_validator("image", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class ImageURL(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(Strict):
    """One part of a message: ``{"type": "text", "text": ...}`` or ``{"type": "image_url", "image_url": {"url": ...}}``."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @field_validator("image_url", mode="before")
    @classmethod
    def _url_string(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _consistent(self) -> "ContentPart":
        if self.type == "text" and (self.text is None or self.image_url is not None):
            raise ValueError("a part of type 'text' needs 'text' (and no 'image_url')")
        if self.type == "image_url" and (self.image_url is None or self.text is not None):
            raise ValueError("a part of type 'image_url' needs 'image_url': {'url': ...} (and no 'text')")
        return self


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: list[ContentPart] = Field(description="a string, or a list of text and image_url parts")
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _string_content(cls, v: Any) -> Any:
        return [{"type": "text", "text": v}] if isinstance(v, str) else v


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletionRequest(BagelKnobs):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    modalities: list[Literal["text", "image"]] | None = Field(
        None, description='["text"] (default) answers in text, ["image"] returns an image'
    )
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling (with temperature > 0)")
    top_k: int | None = Field(None, ge=0, description="sample among the k likeliest tokens (0: all)")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the answer (not included)")
    n: int | None = Field(None, ge=1, description="answers to write (text; seeds seed, seed+1, ...)")
    stream: bool | None = Field(None, description="text answers as server-sent events (OpenAI's chunks)")
    stream_options: StreamOptions | None = None
    size: str | None = None
    output_format: OutputFormat | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "ChatCompletionRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' applies only with stream: true")
        return self

    @field_validator("modalities")
    @classmethod
    def _one_modality(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != 1:
            raise ValueError('give exactly one output modality: ["text"] or ["image"]')
        return v
