// Stack switching for the fibers that run CUDA threads: a few instructions that save the
// callee-saved registers on the current stack and resume another (glibc's swapcontext would make a
// signal-mask system call per switch, and a kernel switches at every barrier and shuffle).
#include <cstddef>
#include <cstdint>

namespace simt {

#if defined(__x86_64__)
// void simt_switch_context(void** save, void* next)
asm(R"(
  .text
  .globl simt_switch_context
  .type simt_switch_context, @function
simt_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_switch_context, .-simt_switch_context

  .globl simt_fiber_trampoline
  .type simt_fiber_trampoline, @function
simt_fiber_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size simt_fiber_trampoline, .-simt_fiber_trampoline
)");
extern "C" void simt_fiber_trampoline();

// A fresh stack that simt_switch_context resumes into entry(arg).
void* prepare_stack(char* stack, size_t bytes, void (*entry)(void*), void* arg) {
  auto* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack + bytes)) & ~uintptr_t(15));
  uint64_t* sp = top;  // after the first switch's `ret` the trampoline runs with sp == top
  *--sp = reinterpret_cast<uint64_t>(&simt_fiber_trampoline);  // return address of the first switch
  *--sp = 0;                                                  // rbp
  *--sp = 0;                                                  // rbx
  *--sp = reinterpret_cast<uint64_t>(arg);                    // r12
  *--sp = reinterpret_cast<uint64_t>(entry);                  // r13
  *--sp = 0;                                                  // r14
  *--sp = 0;                                                  // r15
  *--sp = 0x037f00001f80ull;                                  // mxcsr (default) | x87 control word << 32
  return sp;
}

#elif defined(__aarch64__)
asm(R"(
  .text
  .globl simt_switch_context
  .type simt_switch_context, %function
simt_switch_context:
  sub sp, sp, #176
  stp x19, x20, [sp, #0]
  stp x21, x22, [sp, #16]
  stp x23, x24, [sp, #32]
  stp x25, x26, [sp, #48]
  stp x27, x28, [sp, #64]
  stp x29, x30, [sp, #80]
  stp d8, d9, [sp, #96]
  stp d10, d11, [sp, #112]
  stp d12, d13, [sp, #128]
  stp d14, d15, [sp, #144]
  mov x9, sp
  str x9, [x0]
  mov sp, x1
  ldp x19, x20, [sp, #0]
  ldp x21, x22, [sp, #16]
  ldp x23, x24, [sp, #32]
  ldp x25, x26, [sp, #48]
  ldp x27, x28, [sp, #64]
  ldp x29, x30, [sp, #80]
  ldp d8, d9, [sp, #96]
  ldp d10, d11, [sp, #112]
  ldp d12, d13, [sp, #128]
  ldp d14, d15, [sp, #144]
  add sp, sp, #176
  ret
  .size simt_switch_context, .-simt_switch_context

  .globl simt_fiber_trampoline
  .type simt_fiber_trampoline, %function
simt_fiber_trampoline:
  mov x0, x19
  blr x20
  brk #0
  .size simt_fiber_trampoline, .-simt_fiber_trampoline
)");
extern "C" void simt_fiber_trampoline();

void* prepare_stack(char* stack, size_t bytes, void (*entry)(void*), void* arg) {
  auto top = (reinterpret_cast<uintptr_t>(stack + bytes)) & ~uintptr_t(15);
  auto* frame = reinterpret_cast<uint64_t*>(top - 176);
  for (int i = 0; i < 22; ++i) frame[i] = 0;
  frame[0] = reinterpret_cast<uint64_t>(arg);                     // x19
  frame[1] = reinterpret_cast<uint64_t>(entry);                   // x20
  frame[11] = reinterpret_cast<uint64_t>(&simt_fiber_trampoline);  // x30 (return address)
  return frame;
}
#else
#error "the SIMT harness switches stacks on x86-64 and AArch64"
#endif

}  // namespace simt
