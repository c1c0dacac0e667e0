// Built with torch-mpu vendored through add_subdirectory.
#include <mpu/mpu.h>

#include <iostream>

int main() {
  try {
    MPU_CHECK(1 + 1 == 3, "arithmetic");
  } catch (const mpu::InvalidArgument& e) {
    std::cout << "consumer_add_subdirectory: " << mpu::build_info() << "\n";
    return 0;
  }
  return 1;
}
