// The CUDA backend's runtime layer: what the op and kernel code above it may use.
export { CudaContext, type CudaModule, type ModuleOptions } from './context.js';
export { cudaAvailability, type CudaAvailability, type CudaDeviceInfo } from './libraries.js';
export { Kernel, type LaunchConfig, type TimingOptions, type TimingResult } from './launch.js';
export type { KernelArg } from './kernel-args.js';
export type { DeviceBuffer, PoolStats } from './memory.js';
export type { CompiledCubin } from './nvrtc.js';
export type { DevicePtr, Dim3 } from './driver.js';
