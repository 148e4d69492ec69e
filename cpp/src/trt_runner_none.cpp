// make_tensorrt_runner where the library was built without TensorRT.
#include "tidar/error.h"
#include "tidar/device_backend.h"

namespace tidar {

std::unique_ptr<Runner> make_tensorrt_runner(const std::string&, const Manifest&, int) {
  throw Error("this build of the C++ runtime has no TensorRT: configure cpp/ with -DTENSORRT_ROOT=DIR (TensorRT's "
              "include/ and lib/) on a machine with CUDA");
}

}  // namespace tidar
