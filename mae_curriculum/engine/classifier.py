"""The fine-tuning engine's model: built from a FinetuneConfig, pre-trained encoder loaded, input sizes
checked, and its size-dependent parameters resized at curriculum stage changes together with their optimizer
moments (EfficientTrain++): a ViT's learnable pos-embed (:func:`resize_pos_embed_`), a Swin's attention windows
and relative-position-bias tables (:func:`resize_swin_`)."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_curriculum.config import ConfigError
from mae_curriculum.engine.pretrained import LoadReport, load_pretrained
from mae_curriculum.models.vit import (
    LinearProbe,
    build_vit,
    has_resizable_pos_embed,
    resample_pos_embed,
)


def build_classifier(cfg, num_classes: int) -> nn.Module:
    """The model of ``cfg.mode`` (a FinetuneConfig)."""
    from mae_curriculum.config_finetune import effective_drop_path

    m = dataclasses.replace(cfg.model, drop_path=effective_drop_path(cfg))  # model.drop_path_ref_epochs applied
    if cfg.mode == "linprobe":
        return LinearProbe(build_vit(m, num_classes, global_pool="token"), num_classes)
    if m.name == "vit":
        return build_vit(m, num_classes, m.global_pool)
    import timm

    def create(**extra):
        try:
            return timm.create_model(m.name, pretrained=False, num_classes=num_classes, drop_path_rate=m.drop_path,
                                     **{**m.kwargs, **extra})
        except RuntimeError as e:  # unknown model name
            raise ConfigError(f"model.name: {e}") from None
        except TypeError as e:
            raise ConfigError(f"model.kwargs do not fit {m.name}: {e}") from None

    model = create()
    if has_resizable_pos_embed(model) and not model.dynamic_img_size and "dynamic_img_size" not in m.kwargs:
        # a ViT/DeiT: its table follows the curriculum stage (resize_pos_embed_), and evaluation at the final
        # size while it is still small interpolates it on the fly
        model = create(dynamic_img_size=True)
    if is_swin(model) and tuple(model.patch_embed.img_size) != (m.img_size, m.img_size):
        with warnings.catch_warnings():  # timm scales the windows with the patch grid (no optimizer yet)
            warnings.simplefilter("ignore")
            model.set_input_size(img_size=(m.img_size, m.img_size))
    return model


def check_input_sizes(model: nn.Module, sizes: list[int], in_chans: int = 3) -> None:
    """Run one image at each size through ``model`` (no grad); a size it refuses (e.g. a window-based model with a
    strict input size) is a ConfigError naming the size."""
    was = model.training
    model.eval()
    try:
        for s in sizes:
            try:
                with torch.no_grad():
                    model(torch.zeros(1, in_chans, s, s))
            except Exception as e:
                msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                raise ConfigError(f"model {type(model).__name__} does not accept {s}x{s} inputs, a size of the "
                                  f"curriculum ({msg}); for Swin set model.kwargs.strict_img_size=false "
                                  f"(timm pads to the window size) or a schedule with sizes it accepts") from None
    finally:
        model.train(was)


def build_for_config(cfg, num_classes: int, sizes: list[int]) -> tuple[nn.Module, "LoadReport | None"]:
    """The model of a FinetuneConfig with its pre-trained encoder loaded (modes finetune / linprobe), checked
    against the input ``sizes`` it will see: a ViT's patch must be ``model.patch_size``; other models run one
    image at each size (see :func:`check_input_sizes`)."""
    m = cfg.model
    model = build_classifier(cfg, num_classes)
    report = load_pretrained(model, cfg.finetune.pretrained) if cfg.mode != "supervised" else None
    vit = model.encoder if isinstance(model, LinearProbe) else model
    if has_resizable_pos_embed(vit):
        if vit.patch_embed.patch_size[0] != m.patch_size:
            raise ConfigError(f"model.patch_size is {m.patch_size} but {m.name} has patches of "
                              f"{vit.patch_embed.patch_size[0]}")
    elif is_swin(model):  # the windows follow the stage (swin_window): every size must give a window >= 1
        w = min(swin_final_windows(model))
        small = [s for s in sizes if w * s // m.img_size < 1]
        if small:
            raise ConfigError(f"model {m.name}: curriculum size {small[0]} gives an attention window of "
                              f"{w} x {small[0]} // {m.img_size} = 0 (window {w} at the final size {m.img_size})")
    else:
        check_input_sizes(model, sizes, m.in_chans)
    return model, report


def resize_pos_embed_(model: nn.Module, img_size: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Resize a timm ViT's learnable pos-embed in place to the grid of ``img_size`` (bilinear), and the same for
    its AdamW moments ``exp_avg`` / ``exp_avg_sq`` in ``optimizer`` (EfficientTrain++). The Parameter object is
    kept, so the optimizer still owns it. Returns False when the grid is unchanged (nothing is touched)."""
    pe = model.patch_embed
    old = tuple(pe.grid_size)
    new = (img_size // pe.patch_size[0], img_size // pe.patch_size[1])
    if new == old:
        return False
    p = model.pos_embed
    old_shape = p.shape
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    with torch.no_grad():
        p.data = resample_pos_embed(p.data, new, old, prefix, "bilinear")
    p.grad = None
    state = optimizer.state.get(p, {}) if optimizer is not None else {}
    for k, v in list(state.items()):  # exp_avg / exp_avg_sq (AdamW), momentum_buffer (SGD)
        if isinstance(v, torch.Tensor) and v.shape == old_shape:
            state[k] = resample_pos_embed(v, new, old, prefix, "bilinear").contiguous()
    pe.set_input_size(img_size=img_size)
    return True


# ---------------------------------------------------------------------------------------------------- Swin
def is_swin(model: nn.Module) -> bool:
    """A timm Swin Transformer (``swin_*``): its attention windows follow the curriculum stage."""
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(model, SwinTransformer)


def _window_attentions(model: nn.Module) -> list[nn.Module]:
    from timm.models.swin_transformer import WindowAttention

    return [m for m in model.modules() if isinstance(m, WindowAttention)]


def swin_final_windows(model: nn.Module) -> tuple[int, ...]:
    """The window of each stage at the model's current (the final) size (a stage whose feature map is smaller
    than its window uses the whole map, as timm and the authors' code do)."""
    return tuple(max(layer.blocks[0].window_size) for layer in model.layers)


def swin_window(final_window: int, size: int, final_size: int) -> int:
    """The attention window at input size ``size``: ``final_window * size // final_size``, i.e. EfficientTrain++'s
    B/32 for the 224 / window-7 (and 384 / window-12) models: every stage's map is a whole number of windows."""
    return max(1, final_window * size // final_size)


def swin_windows(final_windows: tuple[int, ...], size: int, final_size: int) -> tuple[int, ...]:
    """:func:`swin_window` for each stage."""
    return tuple(swin_window(w, size, final_size) for w in final_windows)


def _resize_table(t: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """A ((2h-1)*(2w-1), heads) relative-position-bias table (or one of its optimizer moments) resampled to a
    window ``new``: bilinear on the (2h-1) x (2w-1) grid of offsets, ``align_corners=False`` (EfficientTrain++'s
    rule; a convex combination, so second moments stay >= 0)."""
    heads = t.shape[-1]
    grid = t.reshape(2 * old[0] - 1, 2 * old[1] - 1, heads).permute(2, 0, 1)[None].float()
    out = F.interpolate(grid, size=(2 * new[0] - 1, 2 * new[1] - 1), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).reshape(-1, heads).to(t.dtype).contiguous()


def resize_swin_(model: nn.Module, img_size: int, windows: tuple[int, ...],
                 optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Set a timm Swin to ``img_size`` inputs and attention window ``windows[i]`` at stage ``i`` (clipped to its
    feature map, as timm does), resampling every relative-position-bias table and its optimizer moments (``exp_avg`` /
    ``exp_avg_sq``, any state tensor of the table's shape) with :func:`_resize_table`. timm's ``set_input_size``
    updates the patch embedding, windows, shifts, masks and position indices, but puts a NEW Parameter in place
    of each table (resampled its own way) that the optimizer does not know: the original Parameter object is put
    back with our resampled values, so the optimizer keeps owning it. Returns False when nothing changed."""
    attns = _window_attentions(model)
    before = [(a, a.relative_position_bias_table, tuple(a.window_size)) for a in attns]
    if tuple(model.patch_embed.img_size) == (img_size, img_size) and swin_final_windows(model) == tuple(
            min(w, max(layer.blocks[0].input_resolution)) for w, layer in zip(windows, model.layers)):
        return False
    with warnings.catch_warnings():  # timm's own table resampling (discarded below) warns about indexing
        warnings.simplefilter("ignore")
        model.set_input_size(img_size=(img_size, img_size), window_size=[(w, w) for w in windows])
    for a, p, old in before:
        new = tuple(a.window_size)
        if new != old:
            old_shape = p.shape
            with torch.no_grad():
                p.data = _resize_table(p.data, old, new)
            p.grad = None
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            for k, v in list(state.items()):
                if isinstance(v, torch.Tensor) and v.shape == old_shape:
                    state[k] = _resize_table(v, old, new)
        if a.relative_position_bias_table is not p:
            a.relative_position_bias_table = p  # the optimizer's Parameter, at its new shape
    return True


@contextlib.contextmanager
def swin_at_size(model: nn.Module, img_size: int, windows: tuple[int, ...]):
    """Run a Swin at ``img_size`` / ``windows`` for a while (e.g. evaluation at the final size mid-curriculum), then
    put it back exactly: the tables are restored from a copy, not resampled twice. No optimizer is touched."""
    size = model.patch_embed.img_size[0]
    if not is_swin(model) or size == img_size:
        yield
        return
    old_windows = swin_final_windows(model)
    saved = [(a.relative_position_bias_table, a.relative_position_bias_table.data) for a in _window_attentions(model)]
    resize_swin_(model, img_size, windows)
    try:
        yield
    finally:
        resize_swin_(model, size, old_windows)
        for p, data in saved:
            p.data = data
