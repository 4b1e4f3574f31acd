// kernels_flash.cpp: the flash-attention kernels of kernels/flash_attention.cu (fp32 and bf16
// tensor-core forms, the bf16 ones also with bf16 storage), compiled for the CPU under
// tools/flash_emulate/shim.h (shared memory, mma.sync) after kernels/common.cuh, as NVRTC
// compiles them, and listed by name for the emulated driver.
#include "../flash_emulate/shim.h"
#include "registry.h"
#include "../../kernels/common.cuh"
#include "../../kernels/flash_attention.cu"

std::vector<EmuKernel> emu_kernels_flash() {
    return {
        emu_kernel("flash_attn_fwd_f32", flash_attn_fwd_f32),
        emu_kernel("flash_attn_fwd_bf16", flash_attn_fwd_bf16),
        emu_kernel("flash_attn_bwd_dot", flash_attn_bwd_dot),
        emu_kernel("flash_attn_bwd_dkdv_f32", flash_attn_bwd_dkdv_f32),
        emu_kernel("flash_attn_bwd_dq_f32", flash_attn_bwd_dq_f32),
        emu_kernel("flash_attn_bwd_dkdv_bf16", flash_attn_bwd_dkdv_bf16),
        emu_kernel("flash_attn_bwd_dq_bf16", flash_attn_bwd_dq_bf16),
        emu_kernel("flash_attn_fwd_bf16_io", flash_attn_fwd_bf16_io),
        emu_kernel("flash_attn_bwd_dot_bf16", flash_attn_bwd_dot_bf16),
        emu_kernel("flash_attn_bwd_dkdv_bf16_io", flash_attn_bwd_dkdv_bf16_io),
        emu_kernel("flash_attn_bwd_dq_bf16_io", flash_attn_bwd_dq_bf16_io),
        emu_kernel("flash_attn_fwd_bf16_hs64", flash_attn_fwd_bf16_hs64),
        emu_kernel("flash_attn_fwd_bf16_io_hs64", flash_attn_fwd_bf16_io_hs64),
        emu_kernel("flash_attn_bwd_dkdv_bf16_hs64", flash_attn_bwd_dkdv_bf16_hs64),
        emu_kernel("flash_attn_bwd_dq_bf16_hs64", flash_attn_bwd_dq_bf16_hs64),
        emu_kernel("flash_attn_bwd_dkdv_bf16_io_hs64", flash_attn_bwd_dkdv_bf16_io_hs64),
        emu_kernel("flash_attn_bwd_dq_bf16_io_hs64", flash_attn_bwd_dq_bf16_io_hs64),
        emu_kernel("flash_attn_fwd_bf16_io_sync", flash_attn_fwd_bf16_io_sync),
        emu_kernel("flash_attn_bwd_dkdv_bf16_io_sync", flash_attn_bwd_dkdv_bf16_io_sync),
        emu_kernel("flash_attn_bwd_dq_bf16_io_sync", flash_attn_bwd_dq_bf16_io_sync),
        emu_kernel("flash_attn_fwd_bf16_io_sync_hs64", flash_attn_fwd_bf16_io_sync_hs64),
        emu_kernel("flash_attn_bwd_dkdv_bf16_io_sync_hs64", flash_attn_bwd_dkdv_bf16_io_sync_hs64),
        emu_kernel("flash_attn_bwd_dq_bf16_io_sync_hs64", flash_attn_bwd_dq_bf16_io_sync_hs64),
        emu_kernel("flash_attn_fwd_bf16_expf", flash_attn_fwd_bf16_expf),
        emu_kernel("flash_attn_bwd_dkdv_bf16_expf", flash_attn_bwd_dkdv_bf16_expf),
        emu_kernel("flash_attn_bwd_dq_bf16_expf", flash_attn_bwd_dq_bf16_expf),
        emu_kernel("flash_attn_fwd_bf16_io_expf", flash_attn_fwd_bf16_io_expf),
        emu_kernel("flash_attn_bwd_dkdv_bf16_io_expf", flash_attn_bwd_dkdv_bf16_io_expf),
        emu_kernel("flash_attn_bwd_dq_bf16_io_expf", flash_attn_bwd_dq_bf16_io_expf),
        emu_kernel("flash_attn_fwd_bf16_hs64_expf", flash_attn_fwd_bf16_hs64_expf),
        emu_kernel("flash_attn_fwd_bf16_io_hs64_expf", flash_attn_fwd_bf16_io_hs64_expf),
        emu_kernel("flash_attn_bwd_dkdv_bf16_hs64_expf", flash_attn_bwd_dkdv_bf16_hs64_expf),
        emu_kernel("flash_attn_bwd_dq_bf16_hs64_expf", flash_attn_bwd_dq_bf16_hs64_expf),
        emu_kernel("flash_attn_bwd_dkdv_bf16_io_hs64_expf", flash_attn_bwd_dkdv_bf16_io_hs64_expf),
        emu_kernel("flash_attn_bwd_dq_bf16_io_hs64_expf", flash_attn_bwd_dq_bf16_io_hs64_expf),
        emu_kernel("flash_attn_fwd_bf16_io_sync_expf", flash_attn_fwd_bf16_io_sync_expf),
        emu_kernel("flash_attn_bwd_dkdv_bf16_io_sync_expf", flash_attn_bwd_dkdv_bf16_io_sync_expf),
        emu_kernel("flash_attn_bwd_dq_bf16_io_sync_expf", flash_attn_bwd_dq_bf16_io_sync_expf),
        emu_kernel("flash_attn_fwd_bf16_io_sync_hs64_expf", flash_attn_fwd_bf16_io_sync_hs64_expf),
        emu_kernel("flash_attn_bwd_dkdv_bf16_io_sync_hs64_expf", flash_attn_bwd_dkdv_bf16_io_sync_hs64_expf),
        emu_kernel("flash_attn_bwd_dq_bf16_io_sync_hs64_expf", flash_attn_bwd_dq_bf16_io_sync_hs64_expf),
    };
}
