// kvcore::Error -> Python exceptions by kind; KVCoreError for CUDA, driver and runtime failures.
#include "bindings.h"
#include "kvcore/error.h"

namespace kvcore::bindings {

void register_errors(nb::module_& m) {
  static PyObject* kvcore_error =
      PyErr_NewExceptionWithDoc("kvcore._C.KVCoreError",
                                "A CUDA, driver or runtime failure inside kvcore, or use of a freed object.",
                                PyExc_RuntimeError, nullptr);
  m.attr("KVCoreError") = nb::handle(kvcore_error);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const Error& e) {
      PyObject* type = kvcore_error;
      switch (e.kind()) {
        case ErrorKind::Value: type = PyExc_ValueError; break;
        case ErrorKind::Type: type = PyExc_TypeError; break;
        case ErrorKind::Index: type = PyExc_IndexError; break;
        case ErrorKind::Memory: type = PyExc_MemoryError; break;
        case ErrorKind::Runtime: type = kvcore_error; break;
      }
      PyErr_SetString(type, e.what());
    }
  });
}

}  // namespace kvcore::bindings
