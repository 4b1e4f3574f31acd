// registry.h: the table of emulated kernels: every entry point of kernels/*.cu, by name, with
// a launcher that unpacks cuLaunchKernel's `void** kernelParams` into the kernel's own
// parameter types. Filled by kernels.cpp and kernels_flash.cpp, read by driver.cpp.
#pragma once
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// A launch's parameters copied by value (a launch recorded into a graph keeps them, as the
// GPU's kernel node does, since the caller's kernelParams may change or go away).
struct EmuBoundParams {
    virtual ~EmuBoundParams() = default;
    // In cuLaunchKernel's form: params[i] points at parameter i, inside this object.
    std::vector<void*> params;
};

struct EmuKernel {
    std::string name;
    // Runs the kernel body for the current (block, thread) with these parameters.
    std::function<void(void**)> body;
    // Checks every pointer parameter before a launch: "" when all are null or inside an
    // allocation, else what is wrong.
    std::function<std::string(void**)> check_pointers;
    // Copies the parameters `kernelParams` points at.
    std::function<std::unique_ptr<EmuBoundParams>(void**)> bind;
};

// Defined by driver.cpp: "" when `p` is null or points into (or one past the end of) a live
// device allocation, else a description of the problem.
std::string emu_check_device_pointer(const void* p);

template <class T>
using EmuBare = std::remove_cv_t<std::remove_reference_t<T>>;

template <class... A, std::size_t... I>
void emu_invoke(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<EmuBare<A>*>(p[I])...);
}

template <class... A, std::size_t... I>
std::string emu_check(void** p, std::index_sequence<I...>) {
    std::string why;
    auto one = [&](auto tag, std::size_t i) {
        using T = typename decltype(tag)::type;
        if constexpr (std::is_pointer_v<T>) {
            if (why.empty()) {
                std::string w = emu_check_device_pointer(*static_cast<T*>(p[i]));
                if (!w.empty()) why = "parameter " + std::to_string(i) + ": " + w;
            }
        }
    };
    (one(std::type_identity<EmuBare<A>>{}, I), ...);
    return why;
}

template <class... A>
struct EmuBoundTuple final : EmuBoundParams {
    std::tuple<EmuBare<A>...> values;
    template <std::size_t... I>
    EmuBoundTuple(void** p, std::index_sequence<I...>)
        : values(*static_cast<EmuBare<A>*>(p[I])...) {
        params = {static_cast<void*>(&std::get<I>(values))...};
    }
    EmuBoundTuple(const EmuBoundTuple&) = delete;  // params point into this object
    EmuBoundTuple& operator=(const EmuBoundTuple&) = delete;
};

template <class... A>
EmuKernel emu_kernel(const char* name, void (*f)(A...)) {
    return EmuKernel{
        name,
        [f](void** p) { emu_invoke(f, p, std::index_sequence_for<A...>{}); },
        [](void** p) { return emu_check<A...>(p, std::index_sequence_for<A...>{}); },
        [](void** p) -> std::unique_ptr<EmuBoundParams> {
            return std::make_unique<EmuBoundTuple<A...>>(p, std::index_sequence_for<A...>{});
        },
    };
}

// The kernels of each translation unit.
std::vector<EmuKernel> emu_kernels_main();
std::vector<EmuKernel> emu_kernels_flash();
