// Versioned driver-API function-pointer types, as cudaTypedefs.h names them.
#pragma once

#include "cuda.h"

typedef CUresult (*PFN_cuGetErrorString_v6000)(CUresult, const char**);
typedef CUresult (*PFN_cuGetErrorName_v6000)(CUresult, const char**);
typedef CUresult (*PFN_cuDriverGetVersion_v2020)(int*);
typedef CUresult (*PFN_cuDeviceGet_v2000)(CUdevice*, int);
typedef CUresult (*PFN_cuCtxGetCurrent_v4000)(CUcontext*);
typedef CUresult (*PFN_cuMemAddressReserve_v10020)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long);
typedef CUresult (*PFN_cuMemAddressFree_v10020)(CUdeviceptr, size_t);
typedef CUresult (*PFN_cuMemCreate_v10020)(CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*,
                                           unsigned long long);
typedef CUresult (*PFN_cuMemRelease_v10020)(CUmemGenericAllocationHandle);
typedef CUresult (*PFN_cuMemMap_v10020)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
typedef CUresult (*PFN_cuMemUnmap_v10020)(CUdeviceptr, size_t);
typedef CUresult (*PFN_cuMemSetAccess_v10020)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t);
typedef CUresult (*PFN_cuMemGetAllocationGranularity_v10020)(size_t*, const CUmemAllocationProp*,
                                                             CUmemAllocationGranularity_flags);
typedef CUresult (*PFN_cuMemGetAccess_v10020)(unsigned long long*, const CUmemLocation*, CUdeviceptr);
typedef CUresult (*PFN_cuMemRetainAllocationHandle_v11000)(CUmemGenericAllocationHandle*, void*);
typedef CUresult (*PFN_cuMemExportToShareableHandle_v10020)(void*, CUmemGenericAllocationHandle,
                                                            CUmemAllocationHandleType, unsigned long long);
typedef CUresult (*PFN_cuMemImportFromShareableHandle_v10020)(CUmemGenericAllocationHandle*, void*,
                                                              CUmemAllocationHandleType);
typedef CUresult (*PFN_cuMemGetAllocationPropertiesFromHandle_v10020)(CUmemAllocationProp*,
                                                                      CUmemGenericAllocationHandle);
