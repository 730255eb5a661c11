// Loads libcuda and NVRTC once per process, on first use, initialises the driver and finds the CUDA headers;
// reads a device's properties; and answers `cudaAvailability()`, which never throws, for tests and the CLI.
import { BackendUnavailableError, CudaError } from '../../errors.js';
import { CU_DEVICE_ATTRIBUTE, CudaDriver } from './driver.js';
import { openFirst } from './ffi.js';
import { cudaIncludeSearch, libcudaSearch, nodeLocateHost, notFoundMessage, nvrtcSearch, type LocateHost } from './locate.js';
import { Nvrtc } from './nvrtc.js';

export interface CudaLibraries {
  readonly driver: CudaDriver;
  readonly nvrtc: Nvrtc;
  /** As the driver reports it: 13000 for CUDA 13.0. */
  readonly driverVersion: number;
  /** The folder with cuda_bf16.h that NVRTC gets as -I, if one was found. */
  readonly includeDir: string | undefined;
  readonly includeDirsTried: readonly string[];
}

export interface CudaDeviceInfo {
  readonly index: number;
  readonly name: string;
  readonly computeCapability: readonly [major: number, minor: number];
  readonly smCount: number;
  /** The most dynamic shared memory a block may opt in to. */
  readonly maxSharedBytesOptin: number;
  /** Shared memory an SM holds, and what the driver keeps of it for each resident block (CTAs an SM by shared memory). */
  readonly sharedBytesPerSm: number;
  readonly reservedSharedBytesPerBlock: number;
  readonly l2Bytes: number;
  readonly totalBytes: number;
}

export type CudaAvailability =
  | {
      readonly available: true;
      readonly device: CudaDeviceInfo;
      readonly deviceCount: number;
      readonly driverVersion: string;
      readonly nvrtcVersion: string;
      readonly libcudaPath: string;
      readonly nvrtcPath: string;
      readonly includeDir: string | undefined;
    }
  | { readonly available: false; readonly reason: string };

let loaded: CudaLibraries | undefined;

/** The process's CUDA libraries, loaded on the first call; throws BackendUnavailableError saying what is missing. */
export function loadCudaLibraries(host: LocateHost = nodeLocateHost()): CudaLibraries {
  if (loaded !== undefined) return loaded;
  const search = libcudaSearch(host);
  const { opened, failures } = openFirst(search.candidates);
  if (opened === undefined) throw new BackendUnavailableError('cuda', notFoundMessage(search, failures));
  let driver: CudaDriver;
  try {
    driver = CudaDriver.bind(opened.lib, opened.path);
  } catch (e) {
    throw new BackendUnavailableError('cuda', `${opened.path} is not a usable CUDA driver (${errorText(e)}). ${search.advice}`);
  }
  try {
    driver.init();
  } catch (e) {
    if (!(e instanceof CudaError)) throw e;
    throw new BackendUnavailableError('cuda', `the CUDA driver (${opened.path}) cannot run: ${e.message}. Check nvidia-smi.`);
  }
  const driverVersion = driver.driverVersion();
  const nvrtc = Nvrtc.open(nvrtcSearch(host), host, Math.floor(driverVersion / 1000));
  const include = cudaIncludeSearch(host, nvrtc.path);
  loaded = { driver, nvrtc, driverVersion, includeDir: include.dir, includeDirsTried: include.tried };
  return loaded;
}

export function readDeviceInfo(driver: CudaDriver, index: number): CudaDeviceInfo {
  const dev = driver.device(index);
  const attr = (a: number) => driver.deviceAttribute(a, dev);
  return {
    index,
    name: driver.deviceName(dev),
    computeCapability: [attr(CU_DEVICE_ATTRIBUTE.COMPUTE_CAPABILITY_MAJOR), attr(CU_DEVICE_ATTRIBUTE.COMPUTE_CAPABILITY_MINOR)],
    smCount: attr(CU_DEVICE_ATTRIBUTE.MULTIPROCESSOR_COUNT),
    maxSharedBytesOptin: attr(CU_DEVICE_ATTRIBUTE.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
    sharedBytesPerSm: attr(CU_DEVICE_ATTRIBUTE.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR),
    reservedSharedBytesPerBlock: attr(CU_DEVICE_ATTRIBUTE.RESERVED_SHARED_MEMORY_PER_BLOCK),
    l2Bytes: attr(CU_DEVICE_ATTRIBUTE.L2_CACHE_SIZE),
    totalBytes: driver.deviceTotalMem(dev),
  };
}

/** `sm_80`, `sm_90`, or with `archSpecific` on Hopper and newer `sm_90a` (wgmma, setmaxnreg and the like). */
export function deviceArch(cc: readonly [number, number], archSpecific = false): string {
  return `sm_${cc[0]}${cc[1]}${archSpecific && cc[0] >= 9 ? 'a' : ''}`;
}

/** 13000 -> "13.0", 12040 -> "12.4". */
export function formatCudaVersion(v: number): string {
  return `${Math.floor(v / 1000)}.${Math.floor((v % 1000) / 10)}`;
}

/** Whether a CUDA device can be used here, and why not; never throws. */
export function cudaAvailability(deviceIndex = 0): CudaAvailability {
  try {
    const libs = loadCudaLibraries();
    const deviceCount = libs.driver.deviceCount();
    if (deviceIndex >= deviceCount) {
      return { available: false, reason: `no CUDA device ${deviceIndex}: the driver reports ${deviceCount} device(s)` };
    }
    return {
      available: true,
      device: readDeviceInfo(libs.driver, deviceIndex),
      deviceCount,
      driverVersion: formatCudaVersion(libs.driverVersion),
      nvrtcVersion: `${libs.nvrtc.major}.${libs.nvrtc.minor}`,
      libcudaPath: libs.driver.path,
      nvrtcPath: libs.nvrtc.path,
      includeDir: libs.includeDir,
    };
  } catch (e) {
    return { available: false, reason: errorText(e) };
  }
}

/** The hint appended to a compile log that failed on a missing header. */
export function missingHeaderHint(libs: CudaLibraries): string {
  const where = libs.includeDirsTried.map((d) => `  - ${d}`).join('\n');
  return `hint: NVRTC found no CUDA headers (cuda_bf16.h). Set NSA_CUDA_INCLUDE or CUDA_HOME. Looked in:\n${where}`;
}

function errorText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
