//! Every Vulkan call of the driver, and the only module with `unsafe`.
//!
//! Trust model: the loader and the ICD are trusted to honour the Vulkan specification; the
//! handles passed to them are created here and destroyed here (each owner holds an
//! `Arc<Ctx>`, so the `VkDevice` and `VkInstance` outlive everything made from them).
//! Structures chained into property/feature queries are chained only when the device reports
//! the API version or extension that defines them.
//!
//! Host memory imported with `VK_EXT_external_memory_host` is kept alive by a clone of the
//! edgehal [`Buffer`] it came from; the device only touches it inside [`Ctx::run`], which
//! callers invoke while holding the buffer's read or write lease.

use std::ffi::{c_void, CStr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use ash::vk;
use edgehal_core::buffer::Buffer;
use edgehal_core::sys::mem::{ReadLease, WriteLease};
use edgehal_core::{Error, Result};

use crate::probe::PhysInfo;

fn vkerr(what: &str, r: vk::Result) -> Error {
    Error::Device {
        device: "vulkan".into(),
        msg: format!("{what}: {r}"),
    }
}

/// The loader, opened at run time.
pub struct Loader {
    entry: ash::Entry,
    instance: ash::Instance,
}

impl Loader {
    /// Open `libvulkan.so.1` and create an instance. The error says why Vulkan is unusable.
    pub fn open() -> std::result::Result<Arc<Loader>, String> {
        // SAFETY: `Entry::load` dlopens the system Vulkan loader and resolves its entry points;
        // the loader's initialisers are trusted (same contract as any shared library we link).
        let entry = unsafe { ash::Entry::load() }.map_err(|e| match e {
            ash::LoadingError::LibraryLoadFailure(_) => {
                "unavailable: libvulkan.so.1 not found".to_string()
            }
            ash::LoadingError::MissingEntryPoint(m) => {
                format!("unavailable: libvulkan.so.1 is broken ({m})")
            }
        })?;
        // SAFETY: plain query through a loaded entry.
        let api = match unsafe { entry.try_enumerate_instance_version() } {
            Ok(Some(v)) => v,
            _ => vk::API_VERSION_1_0,
        };
        if api < vk::API_VERSION_1_1 {
            return Err(format!(
                "unavailable: the Vulkan loader offers API {}, edgehal needs 1.1",
                version(api)
            ));
        }
        let app = vk::ApplicationInfo::default()
            .application_name(c"edgehal")
            .engine_name(c"edgehal")
            .api_version(api.min(vk::API_VERSION_1_3));
        let ci = vk::InstanceCreateInfo::default().application_info(&app);
        // SAFETY: `ci` and `app` outlive the call; no allocator callbacks.
        let instance = unsafe { entry.create_instance(&ci, None) }
            .map_err(|e| format!("unavailable: vkCreateInstance failed: {e}"))?;
        Ok(Arc::new(Loader { entry, instance }))
    }

    /// Every physical device with the properties edgehal cares about.
    pub fn devices(&self) -> std::result::Result<Vec<(vk::PhysicalDevice, PhysInfo)>, String> {
        // SAFETY: the instance is alive for `self`'s life.
        let pds = unsafe { self.instance.enumerate_physical_devices() }
            .map_err(|e| format!("vkEnumeratePhysicalDevices: {e}"))?;
        Ok(pds
            .into_iter()
            .enumerate()
            .map(|(i, pd)| (pd, self.describe(i, pd)))
            .collect())
    }

    fn describe(&self, index: usize, pd: vk::PhysicalDevice) -> PhysInfo {
        let inst = &self.instance;
        // SAFETY: `pd` came from this instance; all queried structs live on this stack frame
        // and are chained only when their extension or core version is present.
        unsafe {
            let exts: Vec<String> = inst
                .enumerate_device_extension_properties(pd)
                .unwrap_or_default()
                .iter()
                .filter_map(|e| e.extension_name_as_c_str().ok())
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            let has = |n: &CStr| exts.iter().any(|e| e.as_bytes() == n.to_bytes());
            let props = inst.get_physical_device_properties(pd);
            let api = props.api_version;
            let v12 = api >= vk::API_VERSION_1_2;
            let v13 = api >= vk::API_VERSION_1_3;

            let mut subgroup = vk::PhysicalDeviceSubgroupProperties::default();
            let mut driver = vk::PhysicalDeviceDriverProperties::default();
            let mut host = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
            let has_host = has(ash::ext::external_memory_host::NAME);
            let has_driver = v12 || has(ash::khr::driver_properties::NAME);
            {
                let mut p2 = vk::PhysicalDeviceProperties2::default().push_next(&mut subgroup);
                if has_driver {
                    p2 = p2.push_next(&mut driver);
                }
                if has_host {
                    p2 = p2.push_next(&mut host);
                }
                inst.get_physical_device_properties2(pd, &mut p2);
            }

            let mut s16 = vk::PhysicalDevice16BitStorageFeatures::default();
            let mut s8 = vk::PhysicalDevice8BitStorageFeatures::default();
            let mut f16i8 = vk::PhysicalDeviceShaderFloat16Int8Features::default();
            let mut dot = vk::PhysicalDeviceShaderIntegerDotProductFeatures::default();
            let has_s8 = v12 || has(ash::khr::_8bit_storage::NAME);
            let has_f16i8 = v12 || has(ash::khr::shader_float16_int8::NAME);
            let has_dot = v13 || has(ash::khr::shader_integer_dot_product::NAME);
            {
                let mut f2 = vk::PhysicalDeviceFeatures2::default().push_next(&mut s16);
                if has_s8 {
                    f2 = f2.push_next(&mut s8);
                }
                if has_f16i8 {
                    f2 = f2.push_next(&mut f16i8);
                }
                if has_dot {
                    f2 = f2.push_next(&mut dot);
                }
                inst.get_physical_device_features2(pd, &mut f2);
            }
            let mem = inst.get_physical_device_memory_properties(pd);
            let heaps = mem.memory_heaps
                [..(mem.memory_heap_count as usize).min(vk::MAX_MEMORY_HEAPS)]
                .iter()
                .map(|h| (h.size, h.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL)))
                .collect();
            let sync_fd = has(ash::khr::external_fence_fd::NAME) && {
                let fi = vk::PhysicalDeviceExternalFenceInfo::default()
                    .handle_type(vk::ExternalFenceHandleTypeFlags::SYNC_FD);
                let mut fp = vk::ExternalFenceProperties::default();
                inst.get_physical_device_external_fence_properties(pd, &fi, &mut fp);
                fp.external_fence_features
                    .contains(vk::ExternalFenceFeatureFlags::EXPORTABLE)
            };
            let cstr = |r: std::result::Result<&CStr, _>| {
                r.map(|c: &CStr| c.to_string_lossy().into_owned())
                    .unwrap_or_default()
            };
            PhysInfo {
                index,
                name: cstr(props.device_name_as_c_str()),
                device_type: match props.device_type {
                    vk::PhysicalDeviceType::INTEGRATED_GPU => "integrated-gpu",
                    vk::PhysicalDeviceType::DISCRETE_GPU => "discrete-gpu",
                    vk::PhysicalDeviceType::VIRTUAL_GPU => "virtual-gpu",
                    vk::PhysicalDeviceType::CPU => "cpu",
                    _ => "other",
                }
                .into(),
                vendor_id: props.vendor_id,
                device_id: props.device_id,
                api_version: version(api),
                driver_version: props.driver_version,
                driver_name: if has_driver {
                    cstr(driver.driver_name_as_c_str())
                } else {
                    String::new()
                },
                driver_info: if has_driver {
                    cstr(driver.driver_info_as_c_str())
                } else {
                    String::new()
                },
                heaps,
                subgroup_size: subgroup.subgroup_size,
                max_shared_memory: props.limits.max_compute_shared_memory_size,
                max_workgroup_invocations: props.limits.max_compute_work_group_invocations,
                max_storage_buffer_range: props.limits.max_storage_buffer_range,
                storage_16bit: s16.storage_buffer16_bit_access != 0,
                storage_8bit: s8.storage_buffer8_bit_access != 0,
                shader_int8: f16i8.shader_int8 != 0,
                shader_float16: f16i8.shader_float16 != 0,
                integer_dot_product: dot.shader_integer_dot_product != 0,
                external_memory_host: has_host,
                min_imported_host_pointer_alignment: if has_host {
                    host.min_imported_host_pointer_alignment
                } else {
                    0
                },
                external_memory_fd: has(ash::khr::external_memory_fd::NAME),
                external_memory_dma_buf: has(ash::ext::external_memory_dma_buf::NAME),
                cooperative_matrix: has(ash::khr::cooperative_matrix::NAME),
                external_fence_sync_fd: sync_fd,
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // SAFETY: every device made from this instance holds an `Arc<Loader>`, so none is alive.
        unsafe { self.instance.destroy_instance(None) };
        let _ = &self.entry;
    }
}

/// True when a `major.minor.patch` version string is at least `major.minor`.
fn api_at_least(v: &str, major: u32, minor: u32) -> bool {
    let mut it = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

/// `major.minor.patch` of a packed Vulkan version.
pub fn version(v: u32) -> String {
    format!(
        "{}.{}.{}",
        vk::api_version_major(v),
        vk::api_version_minor(v),
        vk::api_version_patch(v)
    )
}

/// An opened logical device with one compute queue.
pub struct Ctx {
    loader: Arc<Loader>,
    pub info: PhysInfo,
    device: ash::Device,
    queue: Mutex<vk::Queue>,
    qfam: u32,
    mem: vk::PhysicalDeviceMemoryProperties,
    host_import: Option<ash::ext::external_memory_host::Device>,
    fence_fd: Option<ash::khr::external_fence_fd::Device>,
    /// `shaderIntegerDotProduct` was enabled (the integer GEMM uses packed dot products).
    pub int_dot: bool,
    mem_fd: Option<ash::khr::external_memory_fd::Device>,
    set_layout: vk::DescriptorSetLayout,
    pipe_layout: vk::PipelineLayout,
}

/// Bindings of every kernel: 0 = parameters, 1..=4 = data.
pub const BINDINGS: u32 = 5;

impl Ctx {
    /// Create a logical device on `pd`.
    /// `int_dot`: enable `shaderIntegerDotProduct` when the device has it (false forces the
    /// portable integer kernels, for tests and comparisons).
    pub fn open(
        loader: Arc<Loader>,
        pd: vk::PhysicalDevice,
        info: PhysInfo,
        int_dot: bool,
    ) -> Result<Arc<Ctx>> {
        let inst = &loader.instance;
        // SAFETY: `pd` came from `loader`'s instance; the create infos live until the calls
        // return; on any error the objects made so far are destroyed before returning.
        unsafe {
            let fams = inst.get_physical_device_queue_family_properties(pd);
            let qfam = fams
                .iter()
                .position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE))
                .ok_or_else(|| Error::unsupported(format!("{}: no compute queue", info.name)))?
                as u32;
            let prio = [1.0f32];
            let qci = [vk::DeviceQueueCreateInfo::default()
                .queue_family_index(qfam)
                .queue_priorities(&prio)];
            let mut exts: Vec<*const std::ffi::c_char> = Vec::new();
            if info.external_memory_host || info.external_memory_fd {
                exts.push(ash::khr::external_memory::NAME.as_ptr());
            }
            if info.external_memory_host {
                exts.push(ash::ext::external_memory_host::NAME.as_ptr());
            }
            let dma_buf = info.external_memory_fd && info.external_memory_dma_buf;
            if info.external_memory_fd {
                exts.push(ash::khr::external_memory_fd::NAME.as_ptr());
            }
            if dma_buf {
                exts.push(ash::ext::external_memory_dma_buf::NAME.as_ptr());
            }
            if info.external_fence_sync_fd {
                // Its dependency VK_KHR_external_fence is core since 1.1 (edgehal's minimum).
                exts.push(ash::khr::external_fence_fd::NAME.as_ptr());
            }
            let int_dot = int_dot && info.integer_dot_product;
            if int_dot && !api_at_least(&info.api_version, 1, 3) {
                exts.push(ash::khr::shader_integer_dot_product::NAME.as_ptr());
            }
            let mut dot = vk::PhysicalDeviceShaderIntegerDotProductFeatures::default()
                .shader_integer_dot_product(true);
            let mut dci = vk::DeviceCreateInfo::default()
                .queue_create_infos(&qci)
                .enabled_extension_names(&exts);
            if int_dot {
                dci = dci.push_next(&mut dot);
            }
            let device = inst
                .create_device(pd, &dci, None)
                .map_err(|e| vkerr("vkCreateDevice", e))?;
            let queue = device.get_device_queue(qfam, 0);
            let mem = inst.get_physical_device_memory_properties(pd);
            let host_import = info
                .external_memory_host
                .then(|| ash::ext::external_memory_host::Device::new(inst, &device));
            let fence_fd = info
                .external_fence_sync_fd
                .then(|| ash::khr::external_fence_fd::Device::new(inst, &device));
            let mem_fd = dma_buf.then(|| ash::khr::external_memory_fd::Device::new(inst, &device));
            let binds: Vec<vk::DescriptorSetLayoutBinding> = (0..BINDINGS)
                .map(|b| {
                    vk::DescriptorSetLayoutBinding::default()
                        .binding(b)
                        .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                        .descriptor_count(1)
                        .stage_flags(vk::ShaderStageFlags::COMPUTE)
                })
                .collect();
            let set_layout = match device.create_descriptor_set_layout(
                &vk::DescriptorSetLayoutCreateInfo::default().bindings(&binds),
                None,
            ) {
                Ok(l) => l,
                Err(e) => {
                    device.destroy_device(None);
                    return Err(vkerr("vkCreateDescriptorSetLayout", e));
                }
            };
            let pcr = [vk::PushConstantRange::default()
                .stage_flags(vk::ShaderStageFlags::COMPUTE)
                .offset(0)
                .size(4)];
            let layouts = [set_layout];
            let pipe_layout = match device.create_pipeline_layout(
                &vk::PipelineLayoutCreateInfo::default()
                    .set_layouts(&layouts)
                    .push_constant_ranges(&pcr),
                None,
            ) {
                Ok(l) => l,
                Err(e) => {
                    device.destroy_descriptor_set_layout(set_layout, None);
                    device.destroy_device(None);
                    return Err(vkerr("vkCreatePipelineLayout", e));
                }
            };
            Ok(Arc::new(Ctx {
                loader,
                info,
                device,
                queue: Mutex::new(queue),
                qfam,
                mem,
                host_import,
                fence_fd,
                int_dot,
                mem_fd,
                set_layout,
                pipe_layout,
            }))
        }
    }

    fn memory_type(&self, bits: u32, want: vk::MemoryPropertyFlags) -> Option<u32> {
        (0..self.mem.memory_type_count.min(vk::MAX_MEMORY_TYPES as u32)).find(|&i| {
            bits & (1 << i) != 0
                && self.mem.memory_types[i as usize]
                    .property_flags
                    .contains(want)
        })
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: every object made from this device holds an `Arc<Ctx>`; none is alive now.
        unsafe {
            let _ = self.device.device_wait_idle();
            self.device.destroy_pipeline_layout(self.pipe_layout, None);
            self.device
                .destroy_descriptor_set_layout(self.set_layout, None);
            self.device.destroy_device(None);
        }
        let _ = &self.loader;
    }
}

/// Where a buffer's memory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Device-local, mapped when the device allows it.
    Device,
    /// Host-visible and coherent (uploads and readbacks).
    Host,
}

struct MappedPtr(*mut u8);
// SAFETY: the pointer is only dereferenced through `GpuBuffer::write`/`read`, which take
// `&self` and copy with bounds checks; a staging buffer is written by a submit only after the
// previous submission that used it completed (and was read back by the waiter thread).
unsafe impl Send for MappedPtr {}
// SAFETY: as above.
unsafe impl Sync for MappedPtr {}

/// A `VkBuffer` with its own memory (allocated or imported).
pub struct GpuBuffer {
    ctx: Arc<Ctx>,
    pub buf: vk::Buffer,
    mem: vk::DeviceMemory,
    pub size: u64,
    mapped: Option<MappedPtr>,
    /// The imported host buffer, kept alive while the device may use its pages.
    _host: Option<Buffer>,
}

impl GpuBuffer {
    fn make(
        ctx: &Arc<Ctx>,
        size: u64,
        external: Option<vk::ExternalMemoryHandleTypeFlags>,
    ) -> Result<(vk::Buffer, vk::MemoryRequirements)> {
        let usage = vk::BufferUsageFlags::STORAGE_BUFFER
            | vk::BufferUsageFlags::TRANSFER_SRC
            | vk::BufferUsageFlags::TRANSFER_DST;
        let mut ext = vk::ExternalMemoryBufferCreateInfo::default()
            .handle_types(external.unwrap_or_default());
        let mut ci = vk::BufferCreateInfo::default()
            .size(size.max(4))
            .usage(usage)
            .sharing_mode(vk::SharingMode::EXCLUSIVE);
        if external.is_some() {
            ci = ci.push_next(&mut ext);
        }
        // SAFETY: valid create info; the buffer is destroyed by the caller on error or by Drop.
        let buf = unsafe { ctx.device.create_buffer(&ci, None) }
            .map_err(|e| vkerr("vkCreateBuffer", e))?;
        // SAFETY: `buf` was just created on this device.
        let req = unsafe { ctx.device.get_buffer_memory_requirements(buf) };
        Ok((buf, req))
    }

    /// A new buffer of `size` bytes.
    pub fn new(ctx: &Arc<Ctx>, size: u64, place: Placement) -> Result<GpuBuffer> {
        let (buf, req) = Self::make(ctx, size, None)?;
        let hv = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
        let ty = match place {
            Placement::Device => ctx
                .memory_type(
                    req.memory_type_bits,
                    vk::MemoryPropertyFlags::DEVICE_LOCAL | hv,
                )
                .or_else(|| {
                    ctx.memory_type(req.memory_type_bits, vk::MemoryPropertyFlags::DEVICE_LOCAL)
                }),
            Placement::Host => ctx
                .memory_type(
                    req.memory_type_bits,
                    hv | vk::MemoryPropertyFlags::HOST_CACHED,
                )
                .or_else(|| ctx.memory_type(req.memory_type_bits, hv)),
        };
        let Some(ty) = ty else {
            // SAFETY: created above, never used.
            unsafe { ctx.device.destroy_buffer(buf, None) };
            return Err(Error::unsupported(format!(
                "{}: no memory type for a {place:?} buffer",
                ctx.info.name
            )));
        };
        let mappable = ctx.mem.memory_types[ty as usize]
            .property_flags
            .contains(hv);
        let ai = vk::MemoryAllocateInfo::default()
            .allocation_size(req.size)
            .memory_type_index(ty);
        // SAFETY: valid allocate info; on error the buffer is destroyed.
        let mem = match unsafe { ctx.device.allocate_memory(&ai, None) } {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: created above, never used.
                unsafe { ctx.device.destroy_buffer(buf, None) };
                return Err(vkerr(&format!("vkAllocateMemory({} bytes)", req.size), e));
            }
        };
        let mut out = GpuBuffer {
            ctx: Arc::clone(ctx),
            buf,
            mem,
            size,
            mapped: None,
            _host: None,
        };
        // SAFETY: memory and buffer are fresh and unbound; offset 0 satisfies alignment.
        unsafe { ctx.device.bind_buffer_memory(buf, mem, 0) }
            .map_err(|e| vkerr("vkBindBufferMemory", e))?;
        if mappable {
            // SAFETY: host-visible memory, mapped once for its whole life.
            let p = unsafe {
                ctx.device
                    .map_memory(mem, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty())
            }
            .map_err(|e| vkerr("vkMapMemory", e))?;
            out.mapped = Some(MappedPtr(p.cast()));
        }
        Ok(out)
    }

    /// Import the pages of a host buffer without copying. Needs `VK_EXT_external_memory_host`
    /// and an address and length that are multiples of `minImportedHostPointerAlignment`.
    pub fn import(ctx: &Arc<Ctx>, host: &Buffer) -> Result<GpuBuffer> {
        let Some(ext) = &ctx.host_import else {
            return Err(Error::unsupported(
                "VK_EXT_external_memory_host is not available",
            ));
        };
        let align = ctx.info.min_imported_host_pointer_alignment.max(1);
        let len = host.len() as u64;
        if len == 0 || !(host.addr() as u64).is_multiple_of(align) || !len.is_multiple_of(align) {
            return Err(Error::unsupported(format!(
                "host buffer at {:#x}+{len} is not aligned to {align}",
                host.addr()
            )));
        }
        // The pointer is taken from a lease and used after it ends: the mapping stays alive as
        // long as `host` (cloned into the result) does, and the device only uses it during
        // `Ctx::run`, under a lease the caller holds.
        let ptr = {
            let lease = host.read_lease()?;
            lease.ptr() as *mut c_void
        };
        let ht = vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;
        let mut hp = vk::MemoryHostPointerPropertiesEXT::default();
        // SAFETY: `ptr` points at `len` mapped bytes (checked aligned above); `hp` is a valid
        // output struct.
        let r = unsafe {
            (ext.fp().get_memory_host_pointer_properties_ext)(ctx.device.handle(), ht, ptr, &mut hp)
        };
        if r != vk::Result::SUCCESS {
            return Err(vkerr("vkGetMemoryHostPointerPropertiesEXT", r));
        }
        let (buf, req) = Self::make(ctx, len, Some(ht))?;
        let Some(ty) = ctx.memory_type(
            req.memory_type_bits & hp.memory_type_bits,
            vk::MemoryPropertyFlags::empty(),
        ) else {
            // SAFETY: created above, never used.
            unsafe { ctx.device.destroy_buffer(buf, None) };
            return Err(Error::unsupported(
                "no memory type accepts the host pointer",
            ));
        };
        let mut imp = vk::ImportMemoryHostPointerInfoEXT::default()
            .handle_type(ht)
            .host_pointer(ptr);
        let ai = vk::MemoryAllocateInfo::default()
            .allocation_size(len)
            .memory_type_index(ty)
            .push_next(&mut imp);
        // SAFETY: the host range is valid and aligned as the extension requires and outlives
        // the allocation (see above).
        let mem = match unsafe { ctx.device.allocate_memory(&ai, None) } {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: created above, never used.
                unsafe { ctx.device.destroy_buffer(buf, None) };
                return Err(vkerr("vkAllocateMemory(import host pointer)", e));
            }
        };
        let out = GpuBuffer {
            ctx: Arc::clone(ctx),
            buf,
            mem,
            size: len,
            mapped: None,
            _host: Some(host.clone()),
        };
        // SAFETY: fresh buffer and memory of matching size.
        unsafe { ctx.device.bind_buffer_memory(buf, mem, 0) }
            .map_err(|e| vkerr("vkBindBufferMemory", e))?;
        Ok(out)
    }

    /// Import a dma-buf-backed edgehal buffer by its fd (`VK_KHR_external_memory_fd` +
    /// `VK_EXT_external_memory_dma_buf`): the device reads and writes the dma-buf's pages.
    /// The buffer must start at offset 0 of its dma-buf.
    pub fn import_dmabuf(ctx: &Arc<Ctx>, host: &Buffer) -> Result<GpuBuffer> {
        let Some(ext) = &ctx.mem_fd else {
            return Err(Error::unsupported(format!(
                "unavailable: {} has no VK_EXT_external_memory_dma_buf",
                ctx.info.name
            )));
        };
        if host.offset() != 0 || host.is_empty() {
            return Err(Error::unsupported(
                "dma-buf import needs a non-empty buffer at offset 0 of its dma-buf",
            ));
        }
        let Some(fd) = host.fd() else {
            return Err(Error::unsupported("buffer has no dma-buf fd"));
        };
        let total =
            edgehal_core::sys::mem::fd_size(fd).map_err(|e| Error::io("dma-buf size", e))?;
        let len = host.len() as u64;
        if len > total {
            return Err(Error::arg(format!(
                "buffer of {len} bytes is larger than its dma-buf ({total})"
            )));
        }
        let ht = vk::ExternalMemoryHandleTypeFlags::DMA_BUF_EXT;
        let mut fp = vk::MemoryFdPropertiesKHR::default();
        // SAFETY: `fd` is a live dma-buf descriptor (borrowed for the call); `fp` is a valid
        // output struct.
        unsafe { ext.get_memory_fd_properties(ht, fd.as_raw_fd(), &mut fp) }
            .map_err(|e| vkerr("vkGetMemoryFdPropertiesKHR", e))?;
        let (buf, req) = Self::make(ctx, len, Some(ht))?;
        let bits = req.memory_type_bits & fp.memory_type_bits;
        let Some(ty) = ctx.memory_type(bits, vk::MemoryPropertyFlags::empty()) else {
            // SAFETY: created above, never used.
            unsafe { ctx.device.destroy_buffer(buf, None) };
            return Err(Error::unsupported("no memory type accepts the dma-buf"));
        };
        if req.size > total {
            // SAFETY: created above, never used.
            unsafe { ctx.device.destroy_buffer(buf, None) };
            return Err(Error::unsupported(format!(
                "the device needs {} bytes for the buffer, the dma-buf has {total}",
                req.size
            )));
        }
        // A successful import takes ownership of the descriptor: hand it a duplicate.
        let dup = edgehal_core::sys::mem::dup(fd).map_err(|e| Error::io("dup(dma-buf)", e))?;
        let mut imp = vk::ImportMemoryFdInfoKHR::default()
            .handle_type(ht)
            .fd(dup.as_raw_fd());
        let ai = vk::MemoryAllocateInfo::default()
            .allocation_size(total)
            .memory_type_index(ty)
            .push_next(&mut imp);
        // SAFETY: the fd is a dma-buf of `total` bytes; on success the driver owns it (we
        // forget our `OwnedFd`), on failure we still own and close it.
        let mem = match unsafe { ctx.device.allocate_memory(&ai, None) } {
            Ok(m) => {
                std::mem::forget(dup);
                m
            }
            Err(e) => {
                // SAFETY: created above, never used.
                unsafe { ctx.device.destroy_buffer(buf, None) };
                return Err(vkerr("vkAllocateMemory(import dma-buf)", e));
            }
        };
        let out = GpuBuffer {
            ctx: Arc::clone(ctx),
            buf,
            mem,
            size: len,
            mapped: None,
            _host: Some(host.clone()),
        };
        // SAFETY: fresh buffer and memory at least as large as it needs.
        unsafe { ctx.device.bind_buffer_memory(buf, mem, 0) }
            .map_err(|e| vkerr("vkBindBufferMemory", e))?;
        Ok(out)
    }

    /// The imported host buffer, if this is an import.
    pub fn host(&self) -> Option<&Buffer> {
        self._host.as_ref()
    }

    /// True when the CPU can read and write it directly.
    pub fn is_mapped(&self) -> bool {
        self.mapped.is_some()
    }

    /// Copy `src` in at byte `off` (mapped buffers only).
    pub fn write(&self, off: u64, src: &[u8]) -> Result<()> {
        let p = self.range(off, src.len())?;
        // SAFETY: `range` checked the bounds against the mapped size; the device does not use
        // the buffer now (callers write before submitting and after waiting).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
        Ok(())
    }

    /// Copy out `dst.len()` bytes at byte `off` (mapped buffers only).
    pub fn read(&self, off: u64, dst: &mut [u8]) -> Result<()> {
        let p = self.range(off, dst.len())?;
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn range(&self, off: u64, n: usize) -> Result<*mut u8> {
        let Some(m) = &self.mapped else {
            return Err(Error::arg("GPU buffer is not host-visible"));
        };
        if off.checked_add(n as u64).is_none_or(|e| e > self.size) {
            return Err(Error::arg(format!(
                "GPU buffer access {off}+{n} is outside its {} bytes",
                self.size
            )));
        }
        // SAFETY: in bounds of the mapping (checked above).
        Ok(unsafe { m.0.add(off as usize) })
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        // SAFETY: the device is idle for this buffer (executables wait on their fence before
        // returning from a run, and drop only after that).
        unsafe {
            self.ctx.device.destroy_buffer(self.buf, None);
            self.ctx.device.free_memory(self.mem, None);
        }
    }
}

/// A compute pipeline of one kernel with its specialization constants.
pub struct Pipeline {
    ctx: Arc<Ctx>,
    pub pipe: vk::Pipeline,
}

impl Pipeline {
    /// Build from SPIR-V bytes with `spec[i]` as constant_id `i`.
    pub fn new(ctx: &Arc<Ctx>, spirv: &[u8], spec: &[u32]) -> Result<Pipeline> {
        let code = ash::util::read_spv(&mut std::io::Cursor::new(spirv))
            .map_err(|e| Error::arg(format!("bad SPIR-V: {e}")))?;
        // SAFETY: `code` is SPIR-V validated by the build (spirv-val); create info is valid.
        let module = unsafe {
            ctx.device
                .create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&code), None)
        }
        .map_err(|e| vkerr("vkCreateShaderModule", e))?;
        let entries: Vec<vk::SpecializationMapEntry> = (0..spec.len() as u32)
            .map(|i| {
                vk::SpecializationMapEntry::default()
                    .constant_id(i)
                    .offset(i * 4)
                    .size(4)
            })
            .collect();
        let data: Vec<u8> = spec.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let si = vk::SpecializationInfo::default()
            .map_entries(&entries)
            .data(&data);
        let stage = vk::PipelineShaderStageCreateInfo::default()
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(module)
            .name(c"main")
            .specialization_info(&si);
        let ci = [vk::ComputePipelineCreateInfo::default()
            .stage(stage)
            .layout(ctx.pipe_layout)];
        // SAFETY: all referenced structs live until the call returns.
        let r = unsafe {
            ctx.device
                .create_compute_pipelines(vk::PipelineCache::null(), &ci, None)
        };
        // SAFETY: the module is no longer needed once the pipeline exists (or failed).
        unsafe { ctx.device.destroy_shader_module(module, None) };
        let pipe = r
            .map_err(|(_, e)| vkerr("vkCreateComputePipelines", e))?
            .into_iter()
            .next()
            .ok_or_else(|| Error::arg("vkCreateComputePipelines returned nothing"))?;
        Ok(Pipeline {
            ctx: Arc::clone(ctx),
            pipe,
        })
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // SAFETY: command buffers using it are owned by executables that drop first.
        unsafe { self.ctx.device.destroy_pipeline(self.pipe, None) };
    }
}

/// One recorded dispatch.
pub struct Dispatch {
    pub pipe: vk::Pipeline,
    /// Buffers for bindings 0..=4.
    pub bufs: [vk::Buffer; BINDINGS as usize],
    pub base: u32,
    pub groups: [u32; 3],
    /// A barrier is needed before this dispatch (it reads something written earlier).
    pub barrier: bool,
}

/// A command buffer recorded once and replayed, with its descriptor sets and fence.
pub struct Recording {
    ctx: Arc<Ctx>,
    pool: vk::CommandPool,
    dpool: vk::DescriptorPool,
    cmd: vk::CommandBuffer,
    fence: vk::Fence,
}

impl Recording {
    /// Record `steps` into a new command buffer.
    pub fn new(ctx: &Arc<Ctx>, steps: &[Dispatch]) -> Result<Recording> {
        let dev = &ctx.device;
        // Distinct binding tuples share a descriptor set.
        let mut tuples: Vec<[vk::Buffer; BINDINGS as usize]> = Vec::new();
        for s in steps {
            if !tuples.contains(&s.bufs) {
                tuples.push(s.bufs);
            }
        }
        let nsets = tuples.len().max(1) as u32;
        // SAFETY: every create info below is valid and lives until its call returns; objects
        // are owned by the returned `Recording` (destroyed in Drop), including on the error
        // paths after it is constructed.
        unsafe {
            let pool = dev
                .create_command_pool(
                    &vk::CommandPoolCreateInfo::default().queue_family_index(ctx.qfam),
                    None,
                )
                .map_err(|e| vkerr("vkCreateCommandPool", e))?;
            let sizes = [vk::DescriptorPoolSize::default()
                .ty(vk::DescriptorType::STORAGE_BUFFER)
                .descriptor_count(nsets * BINDINGS)];
            let dpool = match dev.create_descriptor_pool(
                &vk::DescriptorPoolCreateInfo::default()
                    .max_sets(nsets)
                    .pool_sizes(&sizes),
                None,
            ) {
                Ok(p) => p,
                Err(e) => {
                    dev.destroy_command_pool(pool, None);
                    return Err(vkerr("vkCreateDescriptorPool", e));
                }
            };
            let mut rec = Recording {
                ctx: Arc::clone(ctx),
                pool,
                dpool,
                cmd: vk::CommandBuffer::null(),
                fence: vk::Fence::null(),
            };
            let mut export = vk::ExportFenceCreateInfo::default()
                .handle_types(vk::ExternalFenceHandleTypeFlags::SYNC_FD);
            let mut fci = vk::FenceCreateInfo::default();
            if ctx.fence_fd.is_some() {
                fci = fci.push_next(&mut export);
            }
            rec.fence = dev
                .create_fence(&fci, None)
                .map_err(|e| vkerr("vkCreateFence", e))?;
            let layouts = vec![ctx.set_layout; nsets as usize];
            let sets = dev
                .allocate_descriptor_sets(
                    &vk::DescriptorSetAllocateInfo::default()
                        .descriptor_pool(dpool)
                        .set_layouts(&layouts),
                )
                .map_err(|e| vkerr("vkAllocateDescriptorSets", e))?;
            for (set, t) in sets.iter().zip(&tuples) {
                let infos: Vec<[vk::DescriptorBufferInfo; 1]> = t
                    .iter()
                    .map(|&b| {
                        [vk::DescriptorBufferInfo::default()
                            .buffer(b)
                            .offset(0)
                            .range(vk::WHOLE_SIZE)]
                    })
                    .collect();
                let writes: Vec<vk::WriteDescriptorSet> = infos
                    .iter()
                    .enumerate()
                    .map(|(i, info)| {
                        vk::WriteDescriptorSet::default()
                            .dst_set(*set)
                            .dst_binding(i as u32)
                            .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                            .buffer_info(info)
                    })
                    .collect();
                dev.update_descriptor_sets(&writes, &[]);
            }
            let cmd = dev
                .allocate_command_buffers(
                    &vk::CommandBufferAllocateInfo::default()
                        .command_pool(pool)
                        .level(vk::CommandBufferLevel::PRIMARY)
                        .command_buffer_count(1),
                )
                .map_err(|e| vkerr("vkAllocateCommandBuffers", e))?;
            rec.cmd = cmd[0];
            dev.begin_command_buffer(rec.cmd, &vk::CommandBufferBeginInfo::default())
                .map_err(|e| vkerr("vkBeginCommandBuffer", e))?;
            let barrier = [vk::MemoryBarrier::default()
                .src_access_mask(vk::AccessFlags::SHADER_WRITE)
                .dst_access_mask(vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE)];
            // Host writes (staging) and every earlier submission on this queue (which may
            // still be running: submits return at once and share the arena) complete before
            // the first dispatch.
            let host_barrier = [vk::MemoryBarrier::default()
                .src_access_mask(vk::AccessFlags::HOST_WRITE | vk::AccessFlags::SHADER_WRITE)
                .dst_access_mask(vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE)];
            dev.cmd_pipeline_barrier(
                rec.cmd,
                vk::PipelineStageFlags::HOST | vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::DependencyFlags::empty(),
                &host_barrier,
                &[],
                &[],
            );
            let mut bound = vk::Pipeline::null();
            let mut bound_set = usize::MAX;
            for s in steps {
                if s.barrier {
                    dev.cmd_pipeline_barrier(
                        rec.cmd,
                        vk::PipelineStageFlags::COMPUTE_SHADER,
                        vk::PipelineStageFlags::COMPUTE_SHADER,
                        vk::DependencyFlags::empty(),
                        &barrier,
                        &[],
                        &[],
                    );
                }
                if s.pipe != bound {
                    dev.cmd_bind_pipeline(rec.cmd, vk::PipelineBindPoint::COMPUTE, s.pipe);
                    bound = s.pipe;
                }
                let si = tuples.iter().position(|t| *t == s.bufs).unwrap_or(0);
                if si != bound_set {
                    dev.cmd_bind_descriptor_sets(
                        rec.cmd,
                        vk::PipelineBindPoint::COMPUTE,
                        ctx.pipe_layout,
                        0,
                        &sets[si..=si],
                        &[],
                    );
                    bound_set = si;
                }
                dev.cmd_push_constants(
                    rec.cmd,
                    ctx.pipe_layout,
                    vk::ShaderStageFlags::COMPUTE,
                    0,
                    &s.base.to_ne_bytes(),
                );
                dev.cmd_dispatch(rec.cmd, s.groups[0], s.groups[1], s.groups[2]);
            }
            let to_host = [vk::MemoryBarrier::default()
                .src_access_mask(vk::AccessFlags::SHADER_WRITE)
                .dst_access_mask(vk::AccessFlags::HOST_READ)];
            dev.cmd_pipeline_barrier(
                rec.cmd,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::PipelineStageFlags::HOST,
                vk::DependencyFlags::empty(),
                &to_host,
                &[],
                &[],
            );
            dev.end_command_buffer(rec.cmd)
                .map_err(|e| vkerr("vkEndCommandBuffer", e))?;
            Ok(rec)
        }
    }

    /// Submit the recorded commands and return at once. The caller keeps every buffer the
    /// recording uses (and the leases of imported host memory) alive until [`Recording::done`]
    /// says true or the returned sync_file fd becomes readable, and does not submit this
    /// recording again before that.
    pub fn submit(&self) -> Result<Submitted> {
        let dev = &self.ctx.device;
        let cmds = [self.cmd];
        let submit = [vk::SubmitInfo::default().command_buffers(&cmds)];
        {
            let q = self.ctx.queue.lock().unwrap_or_else(|p| p.into_inner());
            // SAFETY: the queue is externally synchronised by the mutex; the command buffer
            // is fully recorded and not pending (callers wait for the previous completion).
            unsafe { dev.queue_submit(*q, &submit, self.fence) }
                .map_err(|e| vkerr("vkQueueSubmit", e))?;
        }
        let Some(ff) = &self.ctx.fence_fd else {
            return Ok(Submitted::Fence);
        };
        let gi = vk::FenceGetFdInfoKHR::default()
            .fence(self.fence)
            .handle_type(vk::ExternalFenceHandleTypeFlags::SYNC_FD);
        // SAFETY: the fence was created exportable as SYNC_FD and has a pending signal
        // operation (just submitted). Exporting with copy transference resets the fence.
        match unsafe { ff.get_fence_fd(&gi) } {
            // -1: the fence had already signalled (allowed for SYNC_FD).
            Ok(-1) => Ok(Submitted::Signalled),
            Ok(fd) if fd >= 0 => {
                // SAFETY: a fresh descriptor the driver handed over to us.
                Ok(Submitted::SyncFd(unsafe { OwnedFd::from_raw_fd(fd) }))
            }
            // Export failed: the fence still carries the payload; poll it instead.
            _ => Ok(Submitted::Fence),
        }
    }

    /// For [`Submitted::Fence`]: wait up to `timeout_ns` for the fence; true (and the fence
    /// reset for the next submit) when it signalled.
    pub fn done(&self, timeout_ns: u64) -> Result<bool> {
        let dev = &self.ctx.device;
        // SAFETY: the fence belongs to this device; only the waiter thread waits on and
        // resets it while a submission is outstanding.
        match unsafe { dev.wait_for_fences(&[self.fence], true, timeout_ns) } {
            Ok(()) => {
                // SAFETY: signalled and not in use by any pending submission.
                unsafe { dev.reset_fences(&[self.fence]) }
                    .map_err(|e| vkerr("vkResetFences", e))?;
                Ok(true)
            }
            Err(vk::Result::TIMEOUT) => Ok(false),
            Err(e) => Err(vkerr("vkWaitForFences", e)),
        }
    }
}

/// How a submission reports completion.
pub enum Submitted {
    /// A sync_file fd that becomes readable (POLLIN) when the work is done.
    SyncFd(OwnedFd),
    /// Poll the recording's `VkFence` with [`Recording::done`].
    Fence,
    /// Already done.
    Signalled,
}

/// Wait until any of `fds` is readable or `timeout_ms` passes (-1: forever); which are.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> std::io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `p` is a live array of `p.len()` pollfds.
        let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
        if r >= 0 {
            return Ok(p
                .iter()
                .map(|x| x.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0)
                .collect());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Reset a non-blocking eventfd's counter to 0 (read it; nothing to read is fine).
pub fn drain_eventfd(fd: BorrowedFd<'_>) {
    let mut v = 0u64;
    // SAFETY: reads at most 8 bytes into a live u64.
    let _ = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

/// A read or write lease of an edgehal buffer held for as long as a submission runs, on any
/// thread: it owns a clone of the buffer, so it needs no borrow.
pub struct HeldLease {
    // Declared first: dropped (lease ended) before the buffer clone it borrows from. Never
    // read: holding it is the point.
    _lease: LeaseKind,
    _buf: Box<Buffer>,
}

enum LeaseKind {
    Read(#[allow(dead_code)] ReadLease<'static>),
    Write(#[allow(dead_code)] WriteLease<'static>),
}

// SAFETY: a lease is a counter held in the buffer's memory block (a mutex-protected state)
// plus a raw pointer edgehal never dereferences through this type; ending it from another
// thread takes the same mutex.
unsafe impl Send for HeldLease {}

impl HeldLease {
    /// Take the read (`write == false`) or write lease of `b`.
    pub fn take(b: &Buffer, write: bool) -> Result<HeldLease> {
        let buf = Box::new(b.clone());
        // SAFETY: the lease borrows from `*buf`, a heap allocation that never moves and is
        // dropped only after the lease (field order above); extending the borrow to 'static
        // is therefore never observable.
        let r: &'static Buffer = unsafe { &*(buf.as_ref() as *const Buffer) };
        let lease = if write {
            LeaseKind::Write(r.write_lease()?)
        } else {
            LeaseKind::Read(r.read_lease()?)
        };
        Ok(HeldLease {
            _lease: lease,
            _buf: buf,
        })
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        // SAFETY: a submission holds an `Arc<Recording>` until it completes, so the command
        // buffer is not pending when the last owner drops it.
        unsafe {
            let dev = &self.ctx.device;
            if self.fence != vk::Fence::null() {
                dev.destroy_fence(self.fence, None);
            }
            dev.destroy_descriptor_pool(self.dpool, None);
            dev.destroy_command_pool(self.pool, None);
        }
    }
}

/// Copy `src` into `dst` at byte 0: directly when `dst` is mapped, otherwise through a
/// host-visible staging buffer and a one-time transfer.
pub fn upload(ctx: &Arc<Ctx>, dst: &GpuBuffer, src: &[u8]) -> Result<()> {
    if dst.is_mapped() {
        return dst.write(0, src);
    }
    if src.len() as u64 > dst.size {
        return Err(Error::arg("upload larger than the destination buffer"));
    }
    let staging = GpuBuffer::new(ctx, src.len() as u64, Placement::Host)?;
    staging.write(0, src)?;
    let dev = &ctx.device;
    // SAFETY: a one-time command buffer copying between two live buffers of this device,
    // waited for before the staging buffer drops; objects are destroyed before returning.
    unsafe {
        let pool = dev
            .create_command_pool(
                &vk::CommandPoolCreateInfo::default().queue_family_index(ctx.qfam),
                None,
            )
            .map_err(|e| vkerr("vkCreateCommandPool", e))?;
        let r = (|| -> Result<()> {
            let cmd = dev
                .allocate_command_buffers(
                    &vk::CommandBufferAllocateInfo::default()
                        .command_pool(pool)
                        .level(vk::CommandBufferLevel::PRIMARY)
                        .command_buffer_count(1),
                )
                .map_err(|e| vkerr("vkAllocateCommandBuffers", e))?[0];
            dev.begin_command_buffer(
                cmd,
                &vk::CommandBufferBeginInfo::default()
                    .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
            )
            .map_err(|e| vkerr("vkBeginCommandBuffer", e))?;
            let region = [vk::BufferCopy::default().size(src.len() as u64)];
            dev.cmd_copy_buffer(cmd, staging.buf, dst.buf, &region);
            dev.end_command_buffer(cmd)
                .map_err(|e| vkerr("vkEndCommandBuffer", e))?;
            let fence = dev
                .create_fence(&vk::FenceCreateInfo::default(), None)
                .map_err(|e| vkerr("vkCreateFence", e))?;
            let cmds = [cmd];
            let submit = [vk::SubmitInfo::default().command_buffers(&cmds)];
            let r = {
                let q = ctx.queue.lock().unwrap_or_else(|p| p.into_inner());
                dev.queue_submit(*q, &submit, fence)
            };
            let r = r
                .and_then(|_| dev.wait_for_fences(&[fence], true, u64::MAX))
                .map_err(|e| vkerr("upload", e));
            dev.destroy_fence(fence, None);
            r
        })();
        dev.destroy_command_pool(pool, None);
        r
    }
}
