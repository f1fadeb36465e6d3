"""Causal 3D video VAE.

Video (B, C, T, H, W) in [-1, 1] is compressed 2**(len(block_out_channels) - 1) times in space and
2**sum(temporal_downsample) times in time. Every convolution is causal in time (padded on the past side
only) and every normalisation is per position (channel RMS norm), so latent frame t depends on input frames
up to t * temporal_ratio only, and the first frame is encoded on its own: an image is a 1-frame video.
Frame counts are 1 + k * temporal_ratio (17 -> 5 latent frames with 4x).

Because everything is causal and frame-local, the video can be processed in time chunks that carry the
last frames of each causal convolution's input forward (`TimeCache`), with results equal to one pass.
Spatial tiling (overlapping tiles, linearly blended) and batch slicing bound memory further.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from einops import rearrange

# Per causal convolution: the input frames the next time chunk still needs (its past context).
TimeCache = dict[nn.Module, torch.Tensor]


class CausalConv3d(nn.Conv3d):
    """3D convolution padded in time on the past side only ("same" padding in space).

    Without a cache the input is zero-padded by kernel_t - 1 past frames. With a cache (a dict shared by
    all layers for one video) the layer streams: it prepends the frames kept from the previous chunk
    (zeros for the first chunk), convolves every complete window, and keeps the frames the next window
    starts from. Streaming over any split of time therefore equals one pass, strided or not.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1):
        kernel_t, kernel_h, kernel_w = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        stride = (stride,) * 3 if isinstance(stride, int) else stride
        super().__init__(
            in_channels, out_channels, (kernel_t, kernel_h, kernel_w), stride=stride,
            padding=(0, kernel_h // 2, kernel_w // 2),
        )
        self.time_pad = kernel_t - 1

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        # x: (B, C, T, H, W)
        if cache is None or (self.time_pad == 0 and self.stride[0] == 1):
            return super().forward(F.pad(x, (0, 0, 0, 0, self.time_pad, 0)))
        past = cache.get(self)
        if past is None:
            past = x.new_zeros(x.shape[0], x.shape[1], self.time_pad, x.shape[3], x.shape[4])
        x = torch.cat([past, x], dim=2)  # (B, C, T_past + T, H, W)
        num_windows = (x.shape[2] - self.kernel_size[0]) // self.stride[0] + 1
        if num_windows < 1:
            raise ValueError(f"time chunk of {x.shape[2]} frames (with past) is shorter than the kernel")
        cache[self] = x[:, :, num_windows * self.stride[0] :].clone()  # a copy: do not pin the whole chunk
        return super().forward(x)


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at each (t, h, w) position: no statistics are shared across time or space."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, ...); the statistic is summed in fp32 even under bf16 autocast. A sum of x * x, not
        # linalg.vector_norm: on CPU a norm over dim 1 is 4-10x slower than this reduction.
        mean_square = torch.sum(x * x, dim=1, keepdim=True, dtype=torch.float32) / x.shape[1]
        scale = torch.rsqrt(mean_square + self.eps).to(x.dtype)
        return x * scale * self.weight.to(x.dtype).view(1, -1, *([1] * (x.ndim - 2)))


class ResBlock(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus a (1x1x1 projected) shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = ChannelRMSNorm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return self.shortcut(x) + h  # (B, C_out, T, H, W)


class SpatialAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame separately (so it is causal in time)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = ChannelRMSNorm(channels)
        self.to_qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        batch, _, _, height, _ = x.shape
        h = rearrange(x, "b c t h w -> (b t) c h w")
        qkv = self.to_qkv(self.norm(h))
        q, k, v = rearrange(qkv, "n (three c) h w -> three n 1 (h w) c", three=3)
        h = F.scaled_dot_product_attention(q, k, v)  # (B*T, 1, H*W, C)
        h = self.proj(rearrange(h, "n 1 (h w) c -> n c h w", h=height))
        return x + rearrange(h, "(b t) c h w -> b c t h w", b=batch)


class Downsample(nn.Module):
    """Halves H and W per frame; with `temporal`, maps 1 + 2n frames to 1 + n.

    The temporal part is a causal conv with kernel 3 and stride 2: output frame 0 sees input frame 0 alone,
    output frame j sees input frames 2j - 2, 2j - 1, 2j.
    """

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.spatial = nn.Conv2d(channels, channels, 3, stride=2)
        self.temporal = CausalConv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        batch = x.shape[0]
        h = rearrange(x, "b c t h w -> (b t) c h w")
        h = self.spatial(F.pad(h, (0, 1, 0, 1)))
        x = rearrange(h, "(b t) c h w -> b c t h w", b=batch)  # (B, C, T, H/2, W/2)
        if self.temporal is not None:
            x = self.temporal(x, cache)  # (B, C, 1 + (T - 1) / 2, H/2, W/2)
        return x


class Upsample(nn.Module):
    """Doubles H and W per frame; with `temporal`, maps 1 + n frames to 1 + 2n.

    The temporal part is a causal conv to 2x channels, unfolded into two frames per input frame; the very
    first frame of the video keeps only the second of its pair, mirroring `Downsample`. The spatial conv
    after the nearest-neighbour doubling maps to `out_channels` (default: unchanged).
    """

    def __init__(self, channels: int, temporal: bool, out_channels: int | None = None):
        super().__init__()
        self.temporal = CausalConv3d(channels, channels * 2, (3, 1, 1)) if temporal else None
        self.spatial = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        batch = x.shape[0]
        if self.temporal is not None:
            is_first_chunk = cache is None or self.temporal not in cache
            x = rearrange(self.temporal(x, cache), "b (two c) t h w -> b c (t two) h w", two=2)
            if is_first_chunk:
                x = x[:, :, 1:]  # (B, C, 2T - 1, H, W)
        h = rearrange(x, "b c t h w -> (b t) c h w")
        h = self.spatial(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return rearrange(h, "(b t) c h w -> b c t h w", b=batch)  # (B, C_out, T', 2H, 2W)


def _mid_blocks(channels: int, attention: bool) -> list[nn.Module]:
    blocks = [ResBlock(channels, channels)]
    if attention:
        blocks.append(SpatialAttention(channels))
    return blocks + [ResBlock(channels, channels)]


class _CausalStack(nn.Module):
    """conv_in -> blocks -> norm, SiLU, conv_out; every block takes (x, cache)."""

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False  # set by ModelMixin.enable_gradient_checkpointing

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for block in self.blocks:
            # checkpointing recomputes a block, so only in one-pass mode (a cache would be updated twice)
            if torch.is_grad_enabled() and self.gradient_checkpointing and cache is None:
                x = self._gradient_checkpointing_func(block, x)
            else:
                x = block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class Encoder(_CausalStack):
    """conv_in -> (res blocks, downsample) per level -> mid blocks -> norm, SiLU, conv_out to moments."""

    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, temporal_downsample,
                 mid_attention):
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, block_out_channels[0], 3)
        blocks = []
        channels = block_out_channels[0]
        for level, level_channels in enumerate(block_out_channels):
            for _ in range(layers_per_block):
                blocks.append(ResBlock(channels, level_channels))
                channels = level_channels
            if level < len(block_out_channels) - 1:
                blocks.append(Downsample(channels, temporal_downsample[level]))
        self.blocks = nn.ModuleList(blocks + _mid_blocks(channels, mid_attention))
        self.norm_out = ChannelRMSNorm(channels)
        self.conv_out = CausalConv3d(channels, out_channels, 3)


class Decoder(_CausalStack):
    """Mirror of `Encoder` with layers_per_block + 1 res blocks per level (as Wan / diffusers decoders).

    With `upsample_to_next_width` each upsampling conv maps straight to the next level's width (as Wan's
    `Resample` does), so that level's first res block runs at its own width with no shortcut projection:
    fewer FLOPs at the doubled resolution. Otherwise the upsampling keeps the width and the next res
    block changes it (the layout of checkpoints made before the option existed).
    """

    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, temporal_downsample,
                 mid_attention, upsample_to_next_width=False):
        super().__init__()
        widths = tuple(reversed(block_out_channels))
        channels = widths[0]
        self.conv_in = CausalConv3d(in_channels, channels, 3)
        blocks = _mid_blocks(channels, mid_attention)
        temporal_upsample = tuple(reversed(temporal_downsample))
        for level, level_channels in enumerate(widths):
            for _ in range(layers_per_block + 1):
                blocks.append(ResBlock(channels, level_channels))
                channels = level_channels
            if level < len(widths) - 1:
                next_width = widths[level + 1] if upsample_to_next_width else channels
                blocks.append(Upsample(channels, temporal_upsample[level], next_width))
                channels = next_width
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = ChannelRMSNorm(channels)
        self.conv_out = CausalConv3d(channels, out_channels, 3)


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Return b with its first `extent` entries along `dim` faded linearly from a's last ones into b's."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    weight = torch.arange(extent, device=b.device, dtype=b.dtype) / extent  # weight of b
    weight = weight.view(-1, *([1] * (-dim - 1)))
    head = a.narrow(dim, a.shape[dim] - extent, extent) * (1 - weight) + b.narrow(dim, 0, extent) * weight
    return torch.cat([head, b.narrow(dim, extent, b.shape[dim] - extent)], dim=dim)


def _tile_and_blend(x: torch.Tensor, fn, tile: int, stride: int, tile_w: int, stride_w: int, scale: float,
                    out_height: int, out_width: int) -> torch.Tensor:
    """Apply `fn` to overlapping (tile x tile_w) windows of x (B, C, T, H, W) taken every (stride, stride_w)
    pixels; outputs are `scale` times larger in space, blended over their overlap and cropped."""
    out_tile, out_stride = int(tile * scale), int(stride * scale)
    out_tile_w, out_stride_w = int(tile_w * scale), int(stride_w * scale)
    height, width = x.shape[-2:]
    rows = [
        [fn(x[..., i : i + tile, j : j + tile_w]) for j in range(0, width, stride_w)]
        for i in range(0, height, stride)
    ]
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, out in enumerate(row):
            if i > 0:
                out = _blend(rows[i - 1][j], out, out_tile - out_stride, dim=-2)
            if j > 0:
                out = _blend(row[j - 1], out, out_tile_w - out_stride_w, dim=-1)
            row[j] = out  # later neighbours blend against the blended tile
            out_row.append(out[..., :out_stride, :out_stride_w])
        out_rows.append(torch.cat(out_row, dim=-1))
    return torch.cat(out_rows, dim=-2)[..., :out_height, :out_width]


class CausalVideoVAE(ModelMixin, ConfigMixin):
    """Causal 3D convolutional VAE for video, with the encode/decode interface of diffusers' video VAEs.

    `encode(x)` takes (B, in_channels, 1 + k * temporal_ratio, H, W) with H, W divisible by the spatial ratio
    and returns a `DiagonalGaussianDistribution` over (B, latent_channels, 1 + k, H / s, W / s);
    `decode(z)` inverts the shapes. Outputs are not clamped. `scaling_factor` and `shift_factor` are only
    stored: callers normalise latents as (z - shift_factor) * scaling_factor.

    Memory controls: in eval mode encode/decode stream over time (frame 0, then `temporal_ratio` frames per
    chunk; decode one latent frame at a time) when `use_framewise_encoding` / `use_framewise_decoding` are
    True (the default); set them False, or call `train()`, for one pass. `enable_tiling(...)` and
    `enable_slicing()` add spatial tiles and one-sample-at-a-time batches.

    `upsample_to_next_width=True` makes each decoder upsampling conv change the width (see `Decoder`); the
    default keeps the parameter layout of earlier checkpoints. `decoder_block_out_channels` and
    `decoder_layers_per_block` (default: the encoder's) give the decoder its own widths and depth, as Wan 2.2's
    `decoder_base_dim` does: a wider decoder can be trained against a frozen encoder, so a latent space that a
    DiT was trained on keeps its meaning while reconstructions sharpen.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ResBlock", "SpatialAttention"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 16,
        block_out_channels: tuple[int, ...] = (64, 128, 256, 256),
        layers_per_block: int = 2,
        temporal_downsample: tuple[bool, ...] = (False, True, True),
        mid_attention: bool = True,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        upsample_to_next_width: bool = False,
        decoder_block_out_channels: tuple[int, ...] | None = None,
        decoder_layers_per_block: int | None = None,
    ):
        super().__init__()
        block_out_channels, temporal_downsample = tuple(block_out_channels), tuple(temporal_downsample)
        decoder_widths = block_out_channels if decoder_block_out_channels is None else tuple(decoder_block_out_channels)
        decoder_layers = layers_per_block if decoder_layers_per_block is None else decoder_layers_per_block
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("latent_channels", latent_channels), ("layers_per_block", layers_per_block),
                            ("decoder_layers_per_block", decoder_layers)):
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        if len(block_out_channels) < 1 or min(block_out_channels) < 1:
            raise ValueError(f"block_out_channels={block_out_channels} must be a non-empty list of positive ints")
        if len(decoder_widths) != len(block_out_channels) or min(decoder_widths) < 1:
            raise ValueError(
                f"decoder_block_out_channels={decoder_block_out_channels} must list {len(block_out_channels)} positive "
                f"ints, one per level of block_out_channels={block_out_channels}"
            )
        if len(temporal_downsample) != len(block_out_channels) - 1:
            raise ValueError(
                f"temporal_downsample={temporal_downsample} has {len(temporal_downsample)} entries; it needs one "
                f"per downsampling step, len(block_out_channels) - 1 = {len(block_out_channels) - 1}"
            )
        if scaling_factor <= 0:
            raise ValueError(f"scaling_factor={scaling_factor} must be positive")

        self.encoder = Encoder(in_channels, 2 * latent_channels, block_out_channels, layers_per_block,
                               temporal_downsample, mid_attention)  # moments: mean and log-variance
        self.decoder = Decoder(latent_channels, out_channels, decoder_widths, decoder_layers, temporal_downsample,
                               mid_attention, upsample_to_next_width=upsample_to_next_width)

        self.use_framewise_encoding = True
        self.use_framewise_decoding = True
        self.use_slicing = False
        self.use_tiling = False
        self.tile_sample_min_height = 256
        self.tile_sample_min_width = 256
        self.tile_sample_stride_height = 192
        self.tile_sample_stride_width = 192
        self.initialize_weights()

    def initialize_weights(self):
        # Convolutions: Xavier-uniform weights and zero biases keep activation scale roughly constant
        # through the (normalised) residual stack.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Attention output projections: zero, so each attention block starts as the identity.
        for module in self.modules():
            if isinstance(module, SpatialAttention):
                nn.init.zeros_(module.proj.weight)
                nn.init.zeros_(module.proj.bias)

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def temporal_compression_ratio(self) -> int:
        return 2 ** sum(bool(t) for t in self.config.temporal_downsample)

    # --- memory controls -------------------------------------------------------------------------------

    def enable_tiling(
        self,
        tile_sample_min_height: int | None = None,
        tile_sample_min_width: int | None = None,
        tile_sample_stride_height: int | None = None,
        tile_sample_stride_width: int | None = None,
    ) -> None:
        """Encode/decode frames larger than the tile in overlapping spatial tiles (sizes in pixels)."""
        sizes = {
            "tile_sample_min_height": tile_sample_min_height or self.tile_sample_min_height,
            "tile_sample_min_width": tile_sample_min_width or self.tile_sample_min_width,
            "tile_sample_stride_height": tile_sample_stride_height or self.tile_sample_stride_height,
            "tile_sample_stride_width": tile_sample_stride_width or self.tile_sample_stride_width,
        }
        ratio = self.spatial_compression_ratio
        for name, value in sizes.items():
            if value % ratio != 0:
                raise ValueError(f"{name}={value} must be divisible by the spatial compression ratio {ratio}")
        for axis in ("height", "width"):
            tile, stride = sizes[f"tile_sample_min_{axis}"], sizes[f"tile_sample_stride_{axis}"]
            if stride > tile:
                raise ValueError(f"tile_sample_stride_{axis}={stride} must not exceed tile_sample_min_{axis}={tile}")
        for name, value in sizes.items():
            setattr(self, name, value)
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode/decode a batch one sample at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    # --- encode -----------------------------------------------------------------------------------------

    def _check_video(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(f"{what} of shape {tuple(x.shape)} must be (B, {channels}, T, H, W)")

    def _encode_frames(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W) -> moments (B, 2 * latent, 1 + (T - 1) / r, H / s, W / s)
        if self.training or not self.use_framewise_encoding:
            return self.encoder(x)
        ratio = self.temporal_compression_ratio
        cache: TimeCache = {}
        chunks = [x[:, :, :1], *x[:, :, 1:].split(ratio, dim=2)] if x.shape[2] > 1 else [x]
        return torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if self.use_tiling and (height > self.tile_sample_min_height or width > self.tile_sample_min_width):
            ratio = self.spatial_compression_ratio
            return _tile_and_blend(
                x, self._encode_frames, self.tile_sample_min_height, self.tile_sample_stride_height,
                self.tile_sample_min_width, self.tile_sample_stride_width, 1 / ratio, height // ratio,
                width // ratio,
            )
        return self._encode_frames(x)

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Encode video (B, C, T, H, W) in [-1, 1] into a diagonal Gaussian posterior over latents."""
        self._check_video(x, self.config.in_channels, "video")
        num_frames, height, width = x.shape[2:]
        t_ratio, s_ratio = self.temporal_compression_ratio, self.spatial_compression_ratio
        if (num_frames - 1) % t_ratio != 0:
            raise ValueError(
                f"frame count {num_frames} must be 1 + k * {t_ratio} (temporal compression ratio {t_ratio})"
            )
        if height % s_ratio != 0 or width % s_ratio != 0:
            raise ValueError(f"frame size {height}x{width} must be divisible by the spatial ratio {s_ratio}")
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(x_slice) for x_slice in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    # --- decode -----------------------------------------------------------------------------------------

    def _decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        # z: (B, latent, T, h, w) -> (B, C, 1 + (T - 1) * r, h * s, w * s)
        if self.training or not self.use_framewise_decoding:
            return self.decoder(z)
        cache: TimeCache = {}
        return torch.cat([self.decoder(frame, cache) for frame in z.split(1, dim=2)], dim=2)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        ratio = self.spatial_compression_ratio
        height, width = z.shape[-2:]
        tile_h, tile_w = self.tile_sample_min_height // ratio, self.tile_sample_min_width // ratio
        if self.use_tiling and (height > tile_h or width > tile_w):
            return _tile_and_blend(
                z, self._decode_frames, tile_h, self.tile_sample_stride_height // ratio, tile_w,
                self.tile_sample_stride_width // ratio, ratio, height * ratio, width * ratio,
            )
        return self._decode_frames(z)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Decode latents (B, latent_channels, T, h, w) into video (B, C, 1 + (T - 1) * r, h * s, w * s)."""
        self._check_video(z, self.config.latent_channels, "latent")
        if self.use_slicing and z.shape[0] > 1:
            sample = torch.cat([self._decode(z_slice) for z_slice in z.split(1)])
        else:
            sample = self._decode(z)
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DecoderOutput | tuple:
        """Reconstruct `sample` through the posterior mode (or a sample of it)."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
