# Decides whether the hand-written kernels in cuda/ are built.
#   BLPA_CUDA=OFF  never
#   BLPA_CUDA=AUTO when nvcc is found and LibTorch was built with CUDA of the same major version
#   BLPA_CUDA=ON   like AUTO, but a missing or mismatched toolkit is a configure error
# No GPU is needed or probed: CI compiles and links the kernels on machines without one.
include(CheckLanguage)

set(BLPA_WITH_CUDA OFF)
# A CUDA LibTorch's config otherwise probes for GPUs by compiling and running a program,
# which fails on machines without one, whether or not our kernels are built.
if(NOT DEFINED TORCH_CUDA_ARCH_LIST)
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0")
endif()
if(NOT BLPA_CUDA STREQUAL "OFF")
  # LibTorch's config resets CMAKE_CUDA_ARCHITECTURES, so ours live in their own variable.
  set(BLPA_CUDA_ARCHITECTURES 80 90 CACHE STRING "GPU architectures of the kernels")
  set(CMAKE_CUDA_ARCHITECTURES ${BLPA_CUDA_ARCHITECTURES})
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    # LibTorch's config warns about (and discards) CMAKE_CUDA_ARCHITECTURES; targets set theirs.
    unset(CMAKE_CUDA_ARCHITECTURES)
    unset(CMAKE_CUDA_ARCHITECTURES CACHE)
    # LibTorch requires C++20; CMake 3.25 does not know nvcc's flag for it.
    if(NOT CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
      set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
      set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
    endif()
    # One CUDA runtime per process: link the shared libcudart that LibTorch also uses.
    set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
    set(BLPA_WITH_CUDA ON)
  elseif(BLPA_CUDA STREQUAL "ON")
    message(FATAL_ERROR "BLPA_CUDA=ON but no CUDA compiler was found. Install a CUDA toolkit whose major "
                        "version matches LibTorch's (scripts/setup.sh does), or set CUDACXX, or use -DBLPA_CUDA=OFF.")
  else()
    message(STATUS "blpa: no CUDA compiler found; building the CPU path only")
  endif()
endif()

# LibTorch's CUDA version: torch/version.py for a wheel, build-version ("2.x.y+cu132") for the zip.
function(blpa_torch_cuda_version out)
  set(ver "")
  get_filename_component(root "${Torch_DIR}/../../.." ABSOLUTE)
  if(EXISTS "${root}/version.py")
    file(STRINGS "${root}/version.py" line REGEX "^cuda")
    string(REGEX MATCH "[0-9]+\\.[0-9]+" ver "${line}")
  elseif(EXISTS "${root}/build-version")
    file(READ "${root}/build-version" bv)
    string(REGEX MATCH "cu([0-9]+)([0-9])" m "${bv}")
    if(m)
      set(ver "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")
    endif()
  endif()
  set(${out} "${ver}" PARENT_SCOPE)
endfunction()

macro(blpa_check_torch_cuda)
  if(BLPA_WITH_CUDA)
    blpa_torch_cuda_version(BLPA_TORCH_CUDA_VERSION)
    string(REGEX MATCH "^[0-9]+" _torch_major "${BLPA_TORCH_CUDA_VERSION}")
    string(REGEX MATCH "^[0-9]+" _nvcc_major "${CMAKE_CUDA_COMPILER_VERSION}")
    set(_why "")
    if(NOT TARGET torch_cuda AND NOT TORCH_CUDA_LIBRARIES)
      set(_why "LibTorch at ${Torch_DIR} was built without CUDA")
    elseif(NOT _torch_major)
      set(_why "the CUDA version of LibTorch at ${Torch_DIR} could not be read")
    elseif(NOT _torch_major STREQUAL _nvcc_major)
      set(_why "LibTorch uses CUDA ${BLPA_TORCH_CUDA_VERSION} but nvcc is ${CMAKE_CUDA_COMPILER_VERSION} (${CMAKE_CUDA_COMPILER}); two CUDA runtimes in one process is a bug")
    endif()
    if(_why)
      if(BLPA_CUDA STREQUAL "ON")
        message(FATAL_ERROR "BLPA_CUDA=ON: ${_why}. Point CUDACXX at a matching nvcc or use -DBLPA_CUDA=OFF.")
      endif()
      message(STATUS "blpa: not building CUDA kernels: ${_why}")
      set(BLPA_WITH_CUDA OFF)
# A CUDA LibTorch's config otherwise probes for GPUs by compiling and running a program,
# which fails on machines without one, whether or not our kernels are built.
if(NOT DEFINED TORCH_CUDA_ARCH_LIST)
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0")
endif()
    else()
      message(STATUS "blpa: CUDA kernels for sm_${BLPA_CUDA_ARCHITECTURES} with nvcc ${CMAKE_CUDA_COMPILER_VERSION}, LibTorch CUDA ${BLPA_TORCH_CUDA_VERSION}")
    endif()
  endif()
endmacro()

# LibTorch's CUDA libraries need the NCCL, cuDNN, ... of the same wheel at link time; an older
# copy that ships with a system toolkit would leave symbols undefined. RPATHs in LibTorch find
# them at run time; -rpath-link does the same for the linker, and our own -rpath, placed
# before the system toolkit's, makes the process load the CUDA runtime LibTorch was built with.
function(blpa_link_torch_wheel_libs)
  get_filename_component(site "${Torch_DIR}/../../../.." ABSOLUTE)
  file(GLOB dirs LIST_DIRECTORIES true "${site}/nvidia/*/lib")
  foreach(d IN LISTS dirs)
    add_link_options("LINKER:-rpath-link,${d}" "LINKER:-rpath,${d}")
  endforeach()
endfunction()
