// Key/value tiles of the kernels that gather selected rows (the selected attention, forward and backward). With
// SLC_BULK on sm_90 each gathered row comes by one bulk copy into rows padded by 16 bytes; otherwise 16-byte
// cp.async copies fill swizzled rows. Needs DK, DV.
#pragma once
#include "nsa_common.cuh"

#if defined(SLC_BULK) && defined(NSA_HAS_BULK_COPY)
#define SLC_USE_BULK 1
#else
#define SLC_USE_BULK 0
#endif
typedef StageTile<SLC_USE_BULK, DK>::Layout KTile;
typedef StageTile<SLC_USE_BULK, DV>::Layout VTile;
#define K_ROW (StageTile<SLC_USE_BULK, DK>::ROW) // elements per key row in shared memory
#define V_ROW (StageTile<SLC_USE_BULK, DV>::ROW)
