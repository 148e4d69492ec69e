// make_ort_cuda_runner where the library was built without CUDA.
#include "tidar/device_backend.h"
#include "tidar/error.h"

namespace tidar {

std::unique_ptr<Runner> make_ort_cuda_runner(const std::string&, const Manifest&, int) {
  throw Error("this build of the C++ runtime has no CUDA: configure cpp/ where CUDA's toolkit is found "
              "(-DCUDAToolkit_ROOT=DIR) for the ONNX Runtime CUDA backend");
}

}  // namespace tidar
