"""The sizes of the embedded world's models: one place, read by training, loading and tests.

No GPU was lent when the world was first trained, so everything here is sized to train on the project's
2-core CPU in about an hour and a half and to sample far above the speed bar there (>= 4 images/s at batch 32,
20 DDIM steps, CFG on): 32x32 images, a factor-4 AutoencoderKL (8x8x4 latents, no attention), and a 3.4M
parameter UNet with cross-attention at 8x8 and 4x4, where shape, colour and texture are decided. The UNet was
then trained further on an H100 (weights/meta.json says how): the sizes stayed, since they meet both bars
(`erasekit toy eval`: 99.7% shape / 100% colour / 100% texture prompt following, about 12 images/s on the CPU).
"""

IMAGE_SIZE = 32
LATENT_SIZE = 8
MAX_TOKENS = 24  # prompts are padded/truncated to this many MiniLM tokens
TEXT_DIM = 384

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    mid_block_add_attention=False,
)

UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=4,  # diffusers reads this as the number of heads
    norm_num_groups=16,
)

# Stable Diffusion's own noise schedule, so that methods tuned on SD see familiar timesteps.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0
