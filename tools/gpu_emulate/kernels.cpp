// kernels.cpp: every kernel family of kernels/*.cu but flash attention (kernels_flash.cpp),
// compiled for the CPU under tools/kernel_emulate/shim.h, each family in its own namespace
// (as NVRTC compiles each in its own module), and listed by name for the emulated driver.
#include "../kernel_emulate/shim.h"
#include "registry.h"
#include "../../kernels/common.cuh"
namespace emb {
#include "../../kernels/embedding.cu"
}
namespace ln {
#include "../../kernels/layernorm.cu"
}
namespace ew {
#include "../../kernels/elementwise.cu"
}
namespace att {
#include "../../kernels/attention.cu"
}
namespace xent {
#include "../../kernels/cross_entropy.cu"
}
namespace adam {
#include "../../kernels/adamw.cu"
}
namespace dec {
#include "../../kernels/decode.cu"
}
namespace cst {
#include "../../kernels/cast.cu"
}
namespace doc {
#include "../../kernels/doctor.cu"
}

#define EMU_KERNEL(ns, f) emu_kernel(#f, ns::f)

std::vector<EmuKernel> emu_kernels_main() {
    return {
        EMU_KERNEL(emb, embedding_forward),
        EMU_KERNEL(emb, embedding_backward_wte),
        EMU_KERNEL(emb, embedding_backward_wpe),
        EMU_KERNEL(ln, layernorm_forward),
        EMU_KERNEL(ln, layernorm_backward_dx),
        EMU_KERNEL(ln, layernorm_backward),
        EMU_KERNEL(ln, layernorm_backward_parts),
        EMU_KERNEL(ln, residual_layernorm_forward),
        EMU_KERNEL(ln, layernorm_recompute),
        EMU_KERNEL(ew, gelu_forward),
        EMU_KERNEL(ew, gelu_backward_inplace),
        EMU_KERNEL(ew, gelu_forward_bf16),
        EMU_KERNEL(ew, gelu_backward_bf16),
        EMU_KERNEL(ew, bias_broadcast),
        EMU_KERNEL(ew, add_inplace),
        EMU_KERNEL(ew, dropout_apply),
        EMU_KERNEL(ew, colsum_parts),
        EMU_KERNEL(ew, reduce_parts_add),
        EMU_KERNEL(att, causal_softmax_forward),
        EMU_KERNEL(att, causal_softmax_backward),
        EMU_KERNEL(xent, cross_entropy_forward_backward),
        EMU_KERNEL(xent, cross_entropy_bf16),
        EMU_KERNEL(adam, sumsq_parts),
        EMU_KERNEL(adam, adamw_update),
        EMU_KERNEL(dec, decode_kv_append),
        EMU_KERNEL(dec, decode_attention),
        EMU_KERNEL(cst, cast_f32_to_bf16),
        EMU_KERNEL(cst, cast_bf16_to_f32),
        EMU_KERNEL(doc, doctor_selftest),
    };
}
