// Built against an installed torch-mpu through find_package(mpu).
#include <mpu/mpu.h>

#include <iostream>

int main() {
  try {
    MPU_CHECK(1 + 1 == 3, "arithmetic");
  } catch (const mpu::InvalidArgument& e) {
    std::cout << "consumer_find_package: " << mpu::build_info() << "\n";
    return 0;
  }
  return 1;
}
